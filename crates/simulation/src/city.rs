//! A seeded city: streets of communities, registered through the registry's public commands.

use geo::{Coord, MultiPolygon, Translate as _};
use partition::CommunityInput;
use partition::synthetic::{SplitMix64, community};
use registry::api::{
    AssignGridWorkerCommand, BuildingJson, CommunityCommand, ImportBuildingsCommand,
    PartitionCommand,
};
use serde_json::Value;

use crate::{SimulationError, request_json};

/// District the demo city belongs to: 三明市梅列区 (GB/T 2260 code 350402).
pub const DISTRICT_CODE: &str = "350402";
/// Most streets a plan may have (3-digit street codes).
pub const STREETS_MAX: usize = 99;
/// Most communities per street (3-digit community codes).
pub const COMMUNITIES_PER_STREET_MAX: usize = 99;
/// Side of one community's square cell, in metres.
const COMMUNITY_SIDE_M: f64 = 900.0;
/// Distance between the cells' corners: the jittered boundaries never overlap (a point is in
/// at most one community, as in a real city).
const COMMUNITY_PITCH_M: f64 = 1_000.0;
/// Where the synthetic generator puts its city, and where the demo city should be (Sanming).
const GENERATOR_ORIGIN: Coord<f64> = Coord {
    x: 111.99,
    y: 27.70,
};
const SANMING_ORIGIN: Coord<f64> = Coord {
    x: 117.60,
    y: 26.24,
};

/// The size of a seeded city.
#[derive(Debug, Clone, Copy)]
pub struct CityPlan {
    pub seed: u64,
    pub streets: usize,
    pub communities_per_street: usize,
    pub buildings_per_community: usize,
}

impl Default for CityPlan {
    /// 4 streets x 6 communities x 115 buildings: about 55,000 households in ~260 grids.
    fn default() -> Self {
        CityPlan {
            seed: 2026,
            streets: 4,
            communities_per_street: 6,
            buildings_per_community: 115,
        }
    }
}

/// One community of the plan, with the names the registry keeps.
#[derive(Debug, Clone)]
pub struct PlannedCommunity {
    pub input: CommunityInput,
    pub name: String,
    pub street_code: String,
    pub street_name: String,
}

impl PlannedCommunity {
    pub fn households(&self) -> u64 {
        self.input
            .buildings
            .iter()
            .map(|building| u64::from(building.households))
            .sum()
    }
}

/// A grid the registry drew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredGrid {
    pub community_id: String,
    pub grid_code: String,
    pub households: u32,
    pub flags: Vec<String>,
}

const STREET_NAMES: [&str; 8] = [
    "列东街道",
    "列西街道",
    "徐碧街道",
    "城关街道",
    "白沙街道",
    "富兴堡街道",
    "荆西街道",
    "三元街道",
];

/// The seeded city: `streets` rows of `communities_per_street` communities, each a jittered
/// octagon of about 900 m with `buildings_per_community` buildings, moved to Sanming.
pub fn plan_city(plan: CityPlan) -> Vec<PlannedCommunity> {
    assert!(plan.streets <= STREETS_MAX, "at most {STREETS_MAX} streets");
    assert!(
        plan.communities_per_street <= COMMUNITIES_PER_STREET_MAX,
        "at most {COMMUNITIES_PER_STREET_MAX} communities per street"
    );
    let mut rng = SplitMix64::new(plan.seed);
    let offset = SANMING_ORIGIN - GENERATOR_ORIGIN;
    let mut communities = Vec::new();
    for street in 0..plan.streets {
        let street_code = format!("{DISTRICT_CODE}{:03}", street + 1);
        let street_name = STREET_NAMES[street % STREET_NAMES.len()].to_owned();
        for number in 0..plan.communities_per_street {
            let index = street * plan.communities_per_street + number;
            let corner = Coord {
                x: number as f64 * COMMUNITY_PITCH_M,
                y: street as f64 * COMMUNITY_PITCH_M,
            };
            let mut input = community(
                &mut rng,
                index,
                corner,
                COMMUNITY_SIDE_M,
                plan.buildings_per_community,
            );
            input.id = format!("s{:02}c{:02}", street + 1, number + 1);
            input.code = format!("{street_code}{:03}", number + 1);
            input.boundary.translate_mut(offset.x, offset.y);
            for building in &mut input.buildings {
                building.position.translate_mut(offset.x, offset.y);
                building.id = format!("{}-{}", input.id, building.id);
            }
            communities.push(PlannedCommunity {
                name: format!("{street_name}第{}社区", number + 1),
                street_code: street_code.clone(),
                street_name: street_name.clone(),
                input,
            });
        }
    }
    communities
}

fn boundary_json(boundary: &MultiPolygon<f64>) -> Vec<Vec<Vec<[f64; 2]>>> {
    boundary
        .0
        .iter()
        .map(|polygon| {
            std::iter::once(polygon.exterior())
                .chain(polygon.interiors())
                .map(|ring| ring.coords().map(|c| [c.x, c.y]).collect())
                .collect()
        })
        .collect()
}

fn accepted(subject: &str, reply: Value) -> Result<Value, SimulationError> {
    if reply["status"] == "accepted" {
        Ok(reply)
    } else {
        Err(SimulationError::Refused {
            subject: subject.to_owned(),
            reply: reply.to_string(),
        })
    }
}

/// Registers every community, imports its buildings, partitions it and assigns a grid worker
/// to every grid, through the registry's commands. Command ids are derived from the plan, so
/// running it again answers duplicates and changes nothing. `progress(done, total)` is called
/// after each community.
pub async fn register_city(
    client: &async_nats::Client,
    communities: &[PlannedCommunity],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<RegisteredGrid>, SimulationError> {
    let mut grids = Vec::new();
    for (done, planned) in communities.iter().enumerate() {
        let id = &planned.input.id;
        let subject = "grids.cmd.register_community";
        let reply = request_json(
            client,
            subject,
            &CommunityCommand {
                command_id: format!("sim-register-{id}"),
                community_id: id.clone(),
                actor: Some("simulation".to_owned()),
                code: planned.input.code.clone(),
                name: planned.name.clone(),
                street: planned.street_name.clone(),
                district: "梅列区".to_owned(),
                boundary: boundary_json(&planned.input.boundary),
            },
        )
        .await?;
        accepted(subject, reply)?;
        for (batch, buildings) in planned
            .input
            .buildings
            .chunks(registry::domain::BUILDINGS_PER_BATCH_MAX)
            .enumerate()
        {
            let subject = "grids.cmd.import_buildings";
            let reply = request_json(
                client,
                subject,
                &ImportBuildingsCommand {
                    command_id: format!("sim-import-{id}-{batch}"),
                    community_id: id.clone(),
                    actor: Some("simulation".to_owned()),
                    buildings: buildings
                        .iter()
                        .map(|building| BuildingJson {
                            id: building.id.clone(),
                            lon: building.position.x(),
                            lat: building.position.y(),
                            households: building.households,
                            population: building.population,
                        })
                        .collect(),
                },
            )
            .await?;
            accepted(subject, reply)?;
        }
        let subject = "grids.cmd.partition";
        let reply = request_json(
            client,
            subject,
            &PartitionCommand {
                command_id: format!("sim-partition-{id}"),
                community_id: id.clone(),
                actor: Some("simulation".to_owned()),
            },
        )
        .await?;
        let reply = accepted(subject, reply)?;
        let drawn = reply["grids_drawn"].as_array().cloned().unwrap_or_default();
        for grid in drawn {
            let grid_code = grid["grid_code"].as_str().unwrap_or_default().to_owned();
            let subject = "grids.cmd.assign_grid_worker";
            let reply = request_json(
                client,
                subject,
                &AssignGridWorkerCommand {
                    command_id: format!("sim-worker-{grid_code}"),
                    community_id: id.clone(),
                    actor: Some("simulation".to_owned()),
                    grid_code: grid_code.clone(),
                    worker_id: format!("w{grid_code}"),
                    worker_name: format!("网格员{}", &grid_code[grid_code.len() - 3..]),
                },
            )
            .await?;
            accepted(subject, reply)?;
            grids.push(RegisteredGrid {
                community_id: id.clone(),
                grid_code,
                households: grid["households"].as_u64().unwrap_or(0) as u32,
                flags: grid["flags"]
                    .as_array()
                    .map(|flags| {
                        flags
                            .iter()
                            .filter_map(|flag| flag.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        progress(done + 1, communities.len());
    }
    Ok(grids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_city_is_big_enough_for_the_demo() {
        let city = plan_city(CityPlan::default());
        let households: u64 = city.iter().map(PlannedCommunity::households).sum();
        let streets: std::collections::BTreeSet<&str> =
            city.iter().map(|c| c.street_code.as_str()).collect();
        assert!(city.len() >= 20, "{} communities", city.len());
        assert!(households >= 50_000, "{households} households");
        assert_eq!(streets.len(), 4);
        assert_eq!(city[7].input.code, "350402002002");
        assert_eq!(city[7].input.id, "s02c02");
        let first = city[0].input.buildings[0].position;
        assert!((117.5..117.8).contains(&first.x()) && (26.2..26.4).contains(&first.y()));
    }
}
