//! The demo's map and grid figures, folded from the GRIDS stream: what the registry stored,
//! drawn with the same SVG and GeoJSON writers as the offline `wangge partition`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use eventstore::{EventStore, ReplayRange};
use geo::{Area as _, Coord, Euclidean, Length as _, MapCoords as _, Point, Polygon};
use partition::{BuildingInput, CommunityInput, Grid, Partition, Quality};
use registry::domain::{Event, GridRecord};
use serde_json::{Value, json};

/// Metres per degree of latitude.
const METRES_PER_DEGREE: f64 = 111_320.0;

/// One community as the registry has it now.
#[derive(Debug, Default)]
struct CommunityState {
    code: String,
    boundary: Option<geo::MultiPolygon<f64>>,
    buildings: BTreeMap<String, (Point<f64>, u32, Option<u32>)>,
    grids: BTreeMap<String, GridRecord>,
}

#[derive(Debug, Default)]
pub struct GridMap {
    communities: BTreeMap<String, CommunityState>,
}

/// Polsby–Popper compactness 4πA/P² in local metres.
fn polsby_popper(polygon: &Polygon<f64>) -> f64 {
    let Some(first) = polygon.exterior().0.first() else {
        return 0.0;
    };
    let kx = METRES_PER_DEGREE * first.y.to_radians().cos();
    let local = polygon.map_coords(|c| Coord {
        x: c.x * kx,
        y: c.y * METRES_PER_DEGREE,
    });
    let perimeter: f64 = std::iter::once(local.exterior())
        .chain(local.interiors())
        .map(|ring| Euclidean.length(ring))
        .sum();
    if perimeter <= 0.0 {
        return 0.0;
    }
    4.0 * std::f64::consts::PI * local.unsigned_area() / (perimeter * perimeter)
}

impl GridMap {
    /// Folds the whole GRIDS stream.
    pub async fn read(store: &EventStore<registry::RegistryCodec>) -> anyhow::Result<GridMap> {
        let mut map = GridMap::default();
        store
            .replay(ReplayRange::default(), |commit| {
                let community = map
                    .communities
                    .entry(commit.aggregate.as_str().to_owned())
                    .or_default();
                for recorded in commit.events {
                    match recorded.event {
                        Event::CommunityRegistered { profile, .. }
                        | Event::CommunityUpdated { profile } => {
                            community.code = profile.code;
                            community.boundary = Some(profile.boundary);
                        }
                        Event::BuildingsImported { buildings, .. } => {
                            for building in buildings {
                                community.buildings.insert(
                                    building.id,
                                    (building.position, building.households, building.population),
                                );
                            }
                        }
                        Event::GridsDrawn { drawn, retired, .. } => {
                            for code in retired {
                                community.grids.remove(&code);
                            }
                            for grid in drawn {
                                community.grids.insert(grid.grid_code.clone(), grid);
                            }
                        }
                        Event::GridWorkerAssigned { .. } => {}
                    }
                }
            })
            .await
            .context("read the GRIDS stream")?;
        Ok(map)
    }

    fn inputs_and_partitions(&self) -> (Vec<CommunityInput>, Vec<Partition>) {
        let mut inputs = Vec::new();
        let mut partitions = Vec::new();
        for (id, community) in &self.communities {
            let Some(boundary) = &community.boundary else {
                continue;
            };
            inputs.push(CommunityInput {
                id: id.clone(),
                code: community.code.clone(),
                boundary: boundary.clone(),
                buildings: community
                    .buildings
                    .iter()
                    .map(
                        |(building_id, (position, households, population))| BuildingInput {
                            id: building_id.clone(),
                            position: *position,
                            footprint: None,
                            households: *households,
                            population: *population,
                            units: Vec::new(),
                        },
                    )
                    .collect(),
            });
            let grids: Vec<Grid> = community
                .grids
                .values()
                .map(|record| Grid {
                    grid_code: record.grid_code.clone(),
                    community_id: id.clone(),
                    households: record.households,
                    population: record.population,
                    members: record.members.clone(),
                    flags: record.flags.clone(),
                    polygon: record.polygon.clone(),
                    detached: record.detached.clone(),
                    polsby_popper: polsby_popper(&record.polygon),
                })
                .collect();
            let quality = Quality::of(&grids, community.buildings.len());
            partitions.push(Partition {
                community_id: id.clone(),
                grids,
                quality,
            });
        }
        (inputs, partitions)
    }

    /// Writes `map.svg` and `grids.geojson` into `out`.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        let (inputs, partitions) = self.inputs_and_partitions();
        let svg = super::partition::svg_map(&inputs, &partitions, None);
        std::fs::write(out.join("map.svg"), svg).context("write map.svg")?;
        let mut geojson = super::partition::grids_geojson(&partitions);
        geojson["attribution"] =
            json!("synthetic city generated by wangge (seeded); no OpenStreetMap data");
        std::fs::write(
            out.join("grids.geojson"),
            serde_json::to_string(&geojson).context("encode grids")? + "\n",
        )
        .context("write grids.geojson")?;
        Ok(())
    }

    /// Grid count, size spread, flags and compactness, as in `wangge partition`'s report.
    pub fn summary(&self) -> Value {
        let (_, partitions) = self.inputs_and_partitions();
        let mut quality: Option<Quality> = None;
        let mut households: Vec<u32> = Vec::new();
        let mut flags: BTreeMap<&'static str, u64> = BTreeMap::new();
        for partition in &partitions {
            for grid in &partition.grids {
                households.push(grid.households);
                for flag in &grid.flags {
                    *flags.entry(flag.as_str()).or_default() += 1;
                }
            }
            match &mut quality {
                None => quality = Some(partition.quality.clone()),
                Some(total) => total.merge(&partition.quality),
            }
        }
        households.sort_unstable();
        let at = |q: f64| -> u32 {
            if households.is_empty() {
                return 0;
            }
            households[((households.len() - 1) as f64 * q).round() as usize]
        };
        let quality = quality.unwrap_or_else(|| Quality::of(&[], 0));
        json!({
            "communities": partitions.len(),
            "grids": households.len(),
            // As the registry stored them: every building's households in some grid.
            "households": households.iter().map(|h| u64::from(*h)).sum::<u64>(),
            "buildings": quality.buildings,
            "households_min": at(0.0),
            "households_p10": at(0.1),
            "households_median": at(0.5),
            "households_p90": at(0.9),
            "households_max": at(1.0),
            "in_range": quality.in_range,
            "flagged": quality.flagged,
            "disconnected": quality.disconnected,
            "flags": flags,
            "polsby_popper_median": (quality.polsby_popper_quantile(0.5) * 1000.0).round() / 1000.0,
            "polsby_popper_p10": (quality.polsby_popper_quantile(0.1) * 1000.0).round() / 1000.0,
        })
    }
}
