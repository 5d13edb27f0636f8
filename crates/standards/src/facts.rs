//! What a city knows of one community. Only `households` is always known; every other fact is
//! optional, and a rule that needs a missing fact reports `Unknown`.

use serde::{Deserialize, Serialize};

/// More households than any real community holds (the largest have a few tens of thousands).
pub const HOUSEHOLDS_MAX: u32 = 200_000;
/// More residents than any real community holds.
pub const POPULATION_MAX: u32 = 1_000_000;

/// Where a community lies, as the documents distinguish it: the central city (中心城区), an
/// outer district or other county-level town (远城区 / 其它县(市)城区), or a township (乡镇).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistrictKind {
    Central,
    Outer,
    Township,
}

impl DistrictKind {
    pub fn label(self) -> &'static str {
        match self {
            DistrictKind::Central => "central",
            DistrictKind::Outer => "outer",
            DistrictKind::Township => "township",
        }
    }
}

/// The known facts of one community. Unknown fields are ignored when deserialising, so a
/// GeoJSON feature's properties can be read directly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommunityFacts {
    pub households: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grids: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_workers: Option<u32>,
    /// All community workers, including the members of the two committees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staff: Option<u32>,
    /// Full-time staff of the community service station, excluding elected members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_station_staff: Option<u32>,
    /// Members of the party committee and the residents' committee (两委) together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committee_members: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub party_members: Option<u32>,
    /// Premises for community work, residents' activities and services, in m².
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_space_m2: Option<f64>,
    /// The one-stop service hall / service centre, in m².
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_hall_m2: Option<f64>,
    /// Operating / work funds of the community, yuan per year, excluding staff pay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_funds_yuan_per_year: Option<f64>,
    /// People's-benefit project funds (惠民项目资金), yuan per year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_funds_yuan_per_year: Option<f64>,
    /// Party organisation activity funds, yuan per year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub party_funds_yuan_per_year: Option<f64>,
    /// Registered volunteers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volunteers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub district: Option<DistrictKind>,
    /// Newly built community (新建), as opposed to an existing or old-town one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newly_built: Option<bool>,
}

/// Why a community's facts were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FactsError {
    #[error("{field} = {value} is more than the {max} a community can have")]
    TooLarge {
        field: &'static str,
        value: u32,
        max: u32,
    },
    #[error("{field} = {value} must be a finite number >= 0")]
    BadNumber { field: &'static str, value: f64 },
}

impl CommunityFacts {
    /// Facts with only the household count known.
    pub fn with_households(households: u32) -> CommunityFacts {
        CommunityFacts {
            households,
            ..CommunityFacts::default()
        }
    }

    /// Refuses figures no community can have, so reports never rest on garbage.
    pub fn validate(&self) -> Result<(), FactsError> {
        let counts = [
            ("households", Some(self.households), HOUSEHOLDS_MAX),
            ("population", self.population, POPULATION_MAX),
            ("grids", self.grids, HOUSEHOLDS_MAX),
            ("grid_workers", self.grid_workers, HOUSEHOLDS_MAX),
            ("staff", self.staff, HOUSEHOLDS_MAX),
            (
                "service_station_staff",
                self.service_station_staff,
                HOUSEHOLDS_MAX,
            ),
            ("committee_members", self.committee_members, HOUSEHOLDS_MAX),
            ("party_members", self.party_members, POPULATION_MAX),
            ("volunteers", self.volunteers, POPULATION_MAX),
        ];
        for (field, value, max) in counts {
            if let Some(value) = value
                && value > max
            {
                return Err(FactsError::TooLarge { field, value, max });
            }
        }
        let amounts = [
            ("activity_space_m2", self.activity_space_m2),
            ("service_hall_m2", self.service_hall_m2),
            ("work_funds_yuan_per_year", self.work_funds_yuan_per_year),
            (
                "project_funds_yuan_per_year",
                self.project_funds_yuan_per_year,
            ),
            ("party_funds_yuan_per_year", self.party_funds_yuan_per_year),
        ];
        for (field, value) in amounts {
            if let Some(value) = value
                && !(value.is_finite() && value >= 0.0)
            {
                return Err(FactsError::BadNumber { field, value });
            }
        }
        Ok(())
    }
}
