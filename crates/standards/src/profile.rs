//! Profiles: one city's rules as data, loaded from TOML and validated before use.

use serde::{Deserialize, Serialize};

use crate::facts::{CommunityFacts, DistrictKind};

/// The seed cities whose profiles are embedded in the binary, in the order of their documents.
pub const CITIES: [&str; 5] = ["wuhan", "hangzhou", "loudi", "yixing", "sanming"];

/// Largest profile text accepted; real profiles are a few kilobytes.
pub const PROFILE_MAX_BYTES: usize = 256 * 1024;
/// Most rules one profile may hold.
const RULES_MAX: usize = 128;
/// Most documents one profile may cite.
const DOCUMENTS_MAX: usize = 16;
/// Most bands one banded rule may hold.
const BANDS_MAX: usize = 32;
/// Longest quoted clause, in characters: a few sentences, never a whole document.
const CLAUSE_MAX_CHARS: usize = 2000;

const WUHAN_TOML: &str = include_str!("../../../config/standards/wuhan.toml");
const HANGZHOU_TOML: &str = include_str!("../../../config/standards/hangzhou.toml");
const LOUDI_TOML: &str = include_str!("../../../config/standards/loudi.toml");
const YIXING_TOML: &str = include_str!("../../../config/standards/yixing.toml");
const SANMING_TOML: &str = include_str!("../../../config/standards/sanming.toml");

/// A city's policy profile: the documents it cites and the rules read from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short lowercase id, e.g. `loudi`.
    pub city: String,
    /// Display name, e.g. `娄底 Loudi`.
    pub name: String,
    pub documents: Vec<Document>,
    pub rules: Vec<Rule>,
}

/// A policy document a rule may cite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// File name of the document among the seed texts.
    pub file: String,
    pub title: String,
    pub city: String,
    pub year: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One requirement, with the exact clause it comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub title: String,
    /// The community fact the rule constrains.
    pub measure: Measure,
    /// Period of the money figures in `require` (funds measures only); facts are per year.
    #[serde(default)]
    pub period: Period,
    /// File name of one of the profile's `documents`.
    pub source: String,
    /// The sentence(s) quoted verbatim from the document.
    pub clause: String,
    /// How the clause was read, where the wording leaves room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default)]
    pub applies: Applies,
    pub require: Requirement,
}

/// Which communities a rule is about; an absent condition means every community.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Applies {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub districts: Option<Vec<DistrictKind>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newly_built: Option<bool>,
}

/// What the rule demands of its measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Requirement {
    /// A fixed minimum and/or maximum.
    Range { min: Option<f64>, max: Option<f64> },
    /// At least `amount` per `per` units of `basis` (e.g. 20 m² per 100 households), raised to
    /// `floor` when below it and lowered to `cap` when above it.
    PerUnit {
        basis: Basis,
        per: f64,
        amount: f64,
        #[serde(default)]
        rounding: Rounding,
        floor: Option<f64>,
        cap: Option<f64>,
    },
    /// A minimum and/or maximum chosen by the band the basis falls in.
    Bands { basis: Basis, bands: Vec<Band> },
    /// Grid count for grids of about `households_per_grid` households or, alternatively,
    /// `population_per_grid` people.
    GridSize {
        households_per_grid: u32,
        population_per_grid: Option<u32>,
    },
}

/// One band of a banded rule: basis values `from..=to` (`to` absent: no upper end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    pub from: u32,
    pub to: Option<u32>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// The community figure a proportional or banded rule scales with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    Households,
    Population,
    PartyMembers,
}

impl Basis {
    pub fn label(self) -> &'static str {
        match self {
            Basis::Households => "households",
            Basis::Population => "population",
            Basis::PartyMembers => "party_members",
        }
    }

    /// How the basis reads after a count, e.g. "1 party member", "100 households".
    pub fn noun(self, count: f64) -> &'static str {
        let one = count == 1.0;
        match self {
            Basis::Households if one => "household",
            Basis::Households => "households",
            Basis::Population if one => "resident",
            Basis::Population => "residents",
            Basis::PartyMembers if one => "party member",
            Basis::PartyMembers => "party members",
        }
    }

    pub(crate) fn value(self, facts: &CommunityFacts) -> Option<f64> {
        match self {
            Basis::Households => Some(f64::from(facts.households)),
            Basis::Population => facts.population.map(f64::from),
            Basis::PartyMembers => facts.party_members.map(f64::from),
        }
    }
}

/// How a proportional requirement is rounded: headcounts round up (1 per 200 households means
/// 6 for 1001 households), areas and money stay exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    #[default]
    None,
    Up,
}

/// Period of a rule's money figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    #[default]
    Year,
    Month,
}

impl Period {
    pub fn per_year(self) -> f64 {
        match self {
            Period::Year => 1.0,
            Period::Month => 12.0,
        }
    }
}

/// A community fact a rule can constrain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    Households,
    Grids,
    GridWorkers,
    /// All community workers, including the two committees' members.
    Staff,
    /// Full-time staff of the community service station, excluding elected members.
    ServiceStationStaff,
    /// Members of the party committee and residents' committee (两委) together.
    CommitteeMembers,
    /// Premises for community work, residents' activities and services.
    ActivitySpaceM2,
    /// The one-stop service hall / service centre.
    ServiceHallM2,
    WorkFundsYuanPerYear,
    ProjectFundsYuanPerYear,
    PartyFundsYuanPerYear,
    Volunteers,
}

impl Measure {
    pub fn label(self) -> &'static str {
        match self {
            Measure::Households => "households",
            Measure::Grids => "grids",
            Measure::GridWorkers => "grid_workers",
            Measure::Staff => "staff",
            Measure::ServiceStationStaff => "service_station_staff",
            Measure::CommitteeMembers => "committee_members",
            Measure::ActivitySpaceM2 => "activity_space_m2",
            Measure::ServiceHallM2 => "service_hall_m2",
            Measure::WorkFundsYuanPerYear => "work_funds_yuan_per_year",
            Measure::ProjectFundsYuanPerYear => "project_funds_yuan_per_year",
            Measure::PartyFundsYuanPerYear => "party_funds_yuan_per_year",
            Measure::Volunteers => "volunteers",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Measure::Households => "households",
            Measure::Grids => "grids",
            Measure::GridWorkers => "workers",
            Measure::Staff | Measure::ServiceStationStaff | Measure::CommitteeMembers => "people",
            Measure::ActivitySpaceM2 | Measure::ServiceHallM2 => "m²",
            Measure::WorkFundsYuanPerYear
            | Measure::ProjectFundsYuanPerYear
            | Measure::PartyFundsYuanPerYear => "yuan/year",
            Measure::Volunteers => "volunteers",
        }
    }

    pub fn is_funds(self) -> bool {
        matches!(
            self,
            Measure::WorkFundsYuanPerYear
                | Measure::ProjectFundsYuanPerYear
                | Measure::PartyFundsYuanPerYear
        )
    }

    pub(crate) fn actual(self, facts: &CommunityFacts) -> Option<f64> {
        match self {
            Measure::Households => Some(f64::from(facts.households)),
            Measure::Grids => facts.grids.map(f64::from),
            Measure::GridWorkers => facts.grid_workers.map(f64::from),
            Measure::Staff => facts.staff.map(f64::from),
            Measure::ServiceStationStaff => facts.service_station_staff.map(f64::from),
            Measure::CommitteeMembers => facts.committee_members.map(f64::from),
            Measure::ActivitySpaceM2 => facts.activity_space_m2,
            Measure::ServiceHallM2 => facts.service_hall_m2,
            Measure::WorkFundsYuanPerYear => facts.work_funds_yuan_per_year,
            Measure::ProjectFundsYuanPerYear => facts.project_funds_yuan_per_year,
            Measure::PartyFundsYuanPerYear => facts.party_funds_yuan_per_year,
            Measure::Volunteers => facts.volunteers.map(f64::from),
        }
    }
}

/// Why a profile was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown city {city:?}: built-in profiles are {}", CITIES.join(", "))]
    UnknownCity { city: String },
    #[error("{origin}: profile is {bytes} bytes, more than the {max} allowed")]
    TooLarge {
        origin: String,
        bytes: usize,
        max: usize,
    },
    #[error("{origin}: not a valid profile: {source}")]
    Syntax {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{origin}: profile says city {found:?} where {expected:?} was expected")]
    CityMismatch {
        origin: String,
        expected: String,
        found: String,
    },
    #[error("profile {city}: {what} has {count} entries, more than the {max} allowed")]
    TooMany {
        city: String,
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("profile {city}: {field} of {item:?} is empty")]
    Empty {
        city: String,
        item: String,
        field: &'static str,
    },
    #[error("profile {city}: rule id {rule_id:?} appears twice")]
    DuplicateRule { city: String, rule_id: String },
    #[error(
        "profile {city}: rule {rule_id} cites {source_file:?}, which is not among its documents"
    )]
    UnknownSource {
        city: String,
        rule_id: String,
        source_file: String,
    },
    #[error("profile {city}: rule {rule_id}: clause has {chars} characters, more than {max}")]
    ClauseTooLong {
        city: String,
        rule_id: String,
        chars: usize,
        max: usize,
    },
    #[error("profile {city}: rule {rule_id}: {field} = {value} must be a finite number {expected}")]
    BadNumber {
        city: String,
        rule_id: String,
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("profile {city}: rule {rule_id}: {low_field} ({low}) is above {high_field} ({high})")]
    Inverted {
        city: String,
        rule_id: String,
        low_field: &'static str,
        low: f64,
        high_field: &'static str,
        high: f64,
    },
    #[error("profile {city}: rule {rule_id}: requires nothing (no minimum and no maximum)")]
    Vacuous { city: String, rule_id: String },
    #[error(
        "profile {city}: rule {rule_id}: bands must start at 0, follow each other without gap or overlap and end open: {problem}"
    )]
    BadBands {
        city: String,
        rule_id: String,
        problem: String,
    },
    #[error(
        "profile {city}: rule {rule_id}: `period = month` is only for money measures, not {measure}"
    )]
    PeriodNotMoney {
        city: String,
        rule_id: String,
        measure: &'static str,
    },
    #[error(
        "profile {city}: rule {rule_id}: a grid_size requirement must constrain `grids`, not {measure}"
    )]
    GridSizeMeasure {
        city: String,
        rule_id: String,
        measure: &'static str,
    },
}

/// The embedded profile of one seed city (`wuhan`, `hangzhou`, `loudi`, `yixing`, `sanming`).
pub fn builtin(city: &str) -> Result<Profile, ProfileError> {
    let text = match city {
        "wuhan" => WUHAN_TOML,
        "hangzhou" => HANGZHOU_TOML,
        "loudi" => LOUDI_TOML,
        "yixing" => YIXING_TOML,
        "sanming" => SANMING_TOML,
        _ => {
            return Err(ProfileError::UnknownCity {
                city: city.to_owned(),
            });
        }
    };
    let origin = format!("config/standards/{city}.toml");
    let profile = Profile::from_toml_str(text, &origin)?;
    if profile.city != city {
        return Err(ProfileError::CityMismatch {
            origin,
            expected: city.to_owned(),
            found: profile.city,
        });
    }
    Ok(profile)
}

/// The five embedded profiles, in the order of [`CITIES`].
pub fn builtin_all() -> Result<Vec<Profile>, ProfileError> {
    CITIES.iter().map(|city| builtin(city)).collect()
}

impl Profile {
    /// Parses and validates a profile; `origin` names the text in errors (e.g. its path).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        if text.len() > PROFILE_MAX_BYTES {
            return Err(ProfileError::TooLarge {
                origin: origin.to_owned(),
                bytes: text.len(),
                max: PROFILE_MAX_BYTES,
            });
        }
        let profile: Profile = toml::from_str(text).map_err(|source| ProfileError::Syntax {
            origin: origin.to_owned(),
            source,
        })?;
        profile.validate()?;
        Ok(profile)
    }

    /// The document a rule cites.
    pub fn document(&self, file: &str) -> Option<&Document> {
        self.documents.iter().find(|document| document.file == file)
    }

    pub fn rule(&self, rule_id: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.id == rule_id)
    }

    /// Checks everything `evaluate` relies on, so that evaluation never meets a malformed rule.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let city = &self.city;
        let empty = |item: &str, field: &'static str| ProfileError::Empty {
            city: city.clone(),
            item: item.to_owned(),
            field,
        };
        if city.trim().is_empty() {
            return Err(empty("profile", "city"));
        }
        if self.name.trim().is_empty() {
            return Err(empty("profile", "name"));
        }
        for (what, count, max) in [
            ("documents", self.documents.len(), DOCUMENTS_MAX),
            ("rules", self.rules.len(), RULES_MAX),
        ] {
            if count > max {
                return Err(ProfileError::TooMany {
                    city: city.clone(),
                    what,
                    count,
                    max,
                });
            }
        }
        for document in &self.documents {
            if document.file.trim().is_empty() {
                return Err(empty(&document.title, "file"));
            }
            if document.title.trim().is_empty() {
                return Err(empty(&document.file, "title"));
            }
        }
        let mut seen: Vec<&str> = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            if rule.id.trim().is_empty() {
                return Err(empty(&rule.title, "id"));
            }
            if seen.contains(&rule.id.as_str()) {
                return Err(ProfileError::DuplicateRule {
                    city: city.clone(),
                    rule_id: rule.id.clone(),
                });
            }
            seen.push(&rule.id);
            self.validate_rule(rule)?;
        }
        Ok(())
    }

    fn validate_rule(&self, rule: &Rule) -> Result<(), ProfileError> {
        let city = &self.city;
        let rule_id = &rule.id;
        for (field, value) in [("title", &rule.title), ("clause", &rule.clause)] {
            if value.trim().is_empty() {
                return Err(ProfileError::Empty {
                    city: city.clone(),
                    item: rule_id.clone(),
                    field,
                });
            }
        }
        let chars = rule.clause.chars().count();
        if chars > CLAUSE_MAX_CHARS {
            return Err(ProfileError::ClauseTooLong {
                city: city.clone(),
                rule_id: rule_id.clone(),
                chars,
                max: CLAUSE_MAX_CHARS,
            });
        }
        if self.document(&rule.source).is_none() {
            return Err(ProfileError::UnknownSource {
                city: city.clone(),
                rule_id: rule_id.clone(),
                source_file: rule.source.clone(),
            });
        }
        if rule.period != Period::Year && !rule.measure.is_funds() {
            return Err(ProfileError::PeriodNotMoney {
                city: city.clone(),
                rule_id: rule_id.clone(),
                measure: rule.measure.label(),
            });
        }
        let non_negative = |field: &'static str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(ProfileError::BadNumber {
                    city: city.clone(),
                    rule_id: rule_id.clone(),
                    field,
                    value,
                    expected: ">= 0",
                })
            }
        };
        let positive = |field: &'static str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(ProfileError::BadNumber {
                    city: city.clone(),
                    rule_id: rule_id.clone(),
                    field,
                    value,
                    expected: "> 0",
                })
            }
        };
        let ordered = |low_field: &'static str,
                       low: Option<f64>,
                       high_field: &'static str,
                       high: Option<f64>| {
            match (low, high) {
                (Some(low), Some(high)) if low > high => Err(ProfileError::Inverted {
                    city: city.clone(),
                    rule_id: rule_id.clone(),
                    low_field,
                    low,
                    high_field,
                    high,
                }),
                _ => Ok(()),
            }
        };
        let vacuous = || ProfileError::Vacuous {
            city: city.clone(),
            rule_id: rule_id.clone(),
        };
        match &rule.require {
            Requirement::Range { min, max } => {
                if min.is_none() && max.is_none() {
                    return Err(vacuous());
                }
                for (field, value) in [("min", min), ("max", max)] {
                    if let Some(value) = value {
                        non_negative(field, *value)?;
                    }
                }
                ordered("min", *min, "max", *max)?;
            }
            Requirement::PerUnit {
                per,
                amount,
                floor,
                cap,
                ..
            } => {
                positive("per", *per)?;
                positive("amount", *amount)?;
                for (field, value) in [("floor", floor), ("cap", cap)] {
                    if let Some(value) = value {
                        non_negative(field, *value)?;
                    }
                }
                ordered("floor", *floor, "cap", *cap)?;
            }
            Requirement::Bands { bands, .. } => {
                let bad = |problem: String| ProfileError::BadBands {
                    city: city.clone(),
                    rule_id: rule_id.clone(),
                    problem,
                };
                if bands.is_empty() {
                    return Err(bad("no bands".to_owned()));
                }
                if bands.len() > BANDS_MAX {
                    return Err(ProfileError::TooMany {
                        city: city.clone(),
                        what: "bands",
                        count: bands.len(),
                        max: BANDS_MAX,
                    });
                }
                let mut next_from = 0_u64;
                for (index, band) in bands.iter().enumerate() {
                    if u64::from(band.from) != next_from {
                        return Err(bad(format!(
                            "band {index} starts at {} instead of {next_from}",
                            band.from
                        )));
                    }
                    let last = index + 1 == bands.len();
                    match band.to {
                        Some(to) if to < band.from => {
                            return Err(bad(format!(
                                "band {index} ends at {to} before it starts at {}",
                                band.from
                            )));
                        }
                        Some(to) if !last => next_from = u64::from(to) + 1,
                        Some(to) => {
                            return Err(bad(format!(
                                "the last band ends at {to} instead of being open"
                            )));
                        }
                        None if !last => {
                            return Err(bad(format!("band {index} is open but not last")));
                        }
                        None => {}
                    }
                    if band.min.is_none() && band.max.is_none() {
                        return Err(vacuous());
                    }
                    for (field, value) in [("min", band.min), ("max", band.max)] {
                        if let Some(value) = value {
                            non_negative(field, value)?;
                        }
                    }
                    ordered("min", band.min, "max", band.max)?;
                }
            }
            Requirement::GridSize {
                households_per_grid,
                population_per_grid,
            } => {
                if rule.measure != Measure::Grids {
                    return Err(ProfileError::GridSizeMeasure {
                        city: city.clone(),
                        rule_id: rule_id.clone(),
                        measure: rule.measure.label(),
                    });
                }
                positive("households_per_grid", f64::from(*households_per_grid))?;
                if let Some(population_per_grid) = population_per_grid {
                    positive("population_per_grid", f64::from(*population_per_grid))?;
                }
            }
        }
        Ok(())
    }
}
