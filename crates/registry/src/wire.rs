//! Stored encodings of the registry's events. Each `vN` module is FROZEN once released: its
//! structs, field order and enum variant order are the bytes on disk (postcard). A change to
//! the domain types adds a new version module and an upcast from the old one; the golden bytes
//! under `tests/golden/` must decode forever.

use eventstore::{CodecError, EncodedEvent, EventCodec};
use geo::{Coord, LineString, MultiPolygon, Point, Polygon};
use partition::Flag;

use crate::domain::{
    Building, CommunityProfile, DrawMode, Event, GridRecord, GridWorker, ItemRejection,
};

/// Version 1 of every registry event. Frozen.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct PolygonV1 {
        /// (lon, lat) positions, closed.
        pub exterior: Vec<(f64, f64)>,
        pub interiors: Vec<Vec<(f64, f64)>>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ProfileV1 {
        pub code: String,
        pub name: String,
        pub street: String,
        pub district: String,
        pub boundary: Vec<PolygonV1>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct CommunityRegisteredV1 {
        pub profile: ProfileV1,
        pub registered_at_ms: i64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct CommunityUpdatedV1 {
        pub profile: ProfileV1,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct BuildingV1 {
        pub id: String,
        pub lon: f64,
        pub lat: f64,
        pub households: u32,
        pub population: Option<u32>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ItemRejectionV1 {
        pub building_id: String,
        pub reason_code: String,
        pub message: String,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct BuildingsImportedV1 {
        pub buildings: Vec<BuildingV1>,
        pub rejected: Vec<ItemRejectionV1>,
    }

    /// Variant order is the stored tag: append only.
    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    pub enum FlagV1 {
        OversizeBuilding,
        SmallCommunity,
        IndivisibleTotal,
        OutOfRange,
        Disconnected,
        NoBuildings,
    }

    /// Variant order is the stored tag: append only.
    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    pub enum DrawModeV1 {
        Full,
        Repair,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct GridV1 {
        pub grid_code: String,
        pub households: u32,
        pub population: u32,
        pub members: Vec<String>,
        pub flags: Vec<FlagV1>,
        pub polygon: PolygonV1,
        pub detached: Vec<PolygonV1>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct GridsDrawnV1 {
        pub mode: DrawModeV1,
        pub drawn: Vec<GridV1>,
        pub retired: Vec<String>,
        pub unchanged: u32,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct GridWorkerAssignedV1 {
        pub grid_code: String,
        pub worker_id: String,
        pub worker_name: String,
        pub assigned_at_ms: i64,
    }
}

use v1::*;

/// Event type names as stored in each commit's envelope.
pub mod event_types {
    pub const COMMUNITY_REGISTERED: &str = "community_registered";
    pub const COMMUNITY_UPDATED: &str = "community_updated";
    pub const BUILDINGS_IMPORTED: &str = "buildings_imported";
    pub const GRIDS_DRAWN: &str = "grids_drawn";
    pub const GRID_WORKER_ASSIGNED: &str = "grid_worker_assigned";
}

fn ring_to_v1(ring: &LineString<f64>) -> Vec<(f64, f64)> {
    ring.0.iter().map(|c| (c.x, c.y)).collect()
}

fn ring_from_v1(ring: &[(f64, f64)]) -> LineString<f64> {
    LineString::new(ring.iter().map(|&(x, y)| Coord { x, y }).collect())
}

fn polygon_to_v1(polygon: &Polygon<f64>) -> PolygonV1 {
    PolygonV1 {
        exterior: ring_to_v1(polygon.exterior()),
        interiors: polygon.interiors().iter().map(ring_to_v1).collect(),
    }
}

fn polygon_from_v1(polygon: &PolygonV1) -> Polygon<f64> {
    Polygon::new(
        ring_from_v1(&polygon.exterior),
        polygon.interiors.iter().map(|r| ring_from_v1(r)).collect(),
    )
}

fn profile_to_v1(profile: &CommunityProfile) -> ProfileV1 {
    ProfileV1 {
        code: profile.code.clone(),
        name: profile.name.clone(),
        street: profile.street.clone(),
        district: profile.district.clone(),
        boundary: profile.boundary.0.iter().map(polygon_to_v1).collect(),
    }
}

fn profile_from_v1(profile: ProfileV1) -> CommunityProfile {
    CommunityProfile {
        code: profile.code,
        name: profile.name,
        street: profile.street,
        district: profile.district,
        boundary: MultiPolygon::new(profile.boundary.iter().map(polygon_from_v1).collect()),
    }
}

fn flag_to_v1(flag: Flag) -> FlagV1 {
    match flag {
        Flag::OversizeBuilding => FlagV1::OversizeBuilding,
        Flag::SmallCommunity => FlagV1::SmallCommunity,
        Flag::IndivisibleTotal => FlagV1::IndivisibleTotal,
        Flag::OutOfRange => FlagV1::OutOfRange,
        Flag::Disconnected => FlagV1::Disconnected,
        Flag::NoBuildings => FlagV1::NoBuildings,
    }
}

fn flag_from_v1(flag: FlagV1) -> Flag {
    match flag {
        FlagV1::OversizeBuilding => Flag::OversizeBuilding,
        FlagV1::SmallCommunity => Flag::SmallCommunity,
        FlagV1::IndivisibleTotal => Flag::IndivisibleTotal,
        FlagV1::OutOfRange => Flag::OutOfRange,
        FlagV1::Disconnected => Flag::Disconnected,
        FlagV1::NoBuildings => Flag::NoBuildings,
    }
}

fn grid_to_v1(grid: &GridRecord) -> GridV1 {
    GridV1 {
        grid_code: grid.grid_code.clone(),
        households: grid.households,
        population: grid.population,
        members: grid.members.clone(),
        flags: grid.flags.iter().copied().map(flag_to_v1).collect(),
        polygon: polygon_to_v1(&grid.polygon),
        detached: grid.detached.iter().map(polygon_to_v1).collect(),
    }
}

fn grid_from_v1(grid: GridV1) -> GridRecord {
    GridRecord {
        grid_code: grid.grid_code,
        households: grid.households,
        population: grid.population,
        members: grid.members,
        flags: grid.flags.into_iter().map(flag_from_v1).collect(),
        polygon: polygon_from_v1(&grid.polygon),
        detached: grid.detached.iter().map(polygon_from_v1).collect(),
    }
}

/// The registry's [`EventCodec`]: writes v1, reads v1.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryCodec;

impl RegistryCodec {
    pub const SCHEMA_VERSION_CURRENT: u16 = 1;
}

fn to_bytes<T: serde::Serialize>(event_type: &str, value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(value).map_err(|error| CodecError::Encode {
        event_type: event_type.to_owned(),
        reason: error.to_string(),
    })
}

fn from_bytes<'a, T: serde::Deserialize<'a>>(
    event_type: &str,
    schema_version: u16,
    payload: &'a [u8],
) -> Result<T, CodecError> {
    postcard::from_bytes(payload).map_err(|error| CodecError::Decode {
        event_type: event_type.to_owned(),
        schema_version,
        reason: error.to_string(),
    })
}

impl EventCodec for RegistryCodec {
    type Event = Event;

    fn encode(&self, event: &Event) -> Result<EncodedEvent, CodecError> {
        let event_type = event.kind();
        let payload = match event {
            Event::CommunityRegistered {
                profile,
                registered_at_ms,
            } => to_bytes(
                event_type,
                &CommunityRegisteredV1 {
                    profile: profile_to_v1(profile),
                    registered_at_ms: *registered_at_ms,
                },
            )?,
            Event::CommunityUpdated { profile } => to_bytes(
                event_type,
                &CommunityUpdatedV1 {
                    profile: profile_to_v1(profile),
                },
            )?,
            Event::BuildingsImported {
                buildings,
                rejected,
            } => to_bytes(
                event_type,
                &BuildingsImportedV1 {
                    buildings: buildings
                        .iter()
                        .map(|b| BuildingV1 {
                            id: b.id.clone(),
                            lon: b.position.x(),
                            lat: b.position.y(),
                            households: b.households,
                            population: b.population,
                        })
                        .collect(),
                    rejected: rejected
                        .iter()
                        .map(|r| ItemRejectionV1 {
                            building_id: r.building_id.clone(),
                            reason_code: r.reason_code.clone(),
                            message: r.message.clone(),
                        })
                        .collect(),
                },
            )?,
            Event::GridsDrawn {
                mode,
                drawn,
                retired,
                unchanged,
            } => to_bytes(
                event_type,
                &GridsDrawnV1 {
                    mode: match mode {
                        DrawMode::Full => DrawModeV1::Full,
                        DrawMode::Repair => DrawModeV1::Repair,
                    },
                    drawn: drawn.iter().map(grid_to_v1).collect(),
                    retired: retired.clone(),
                    unchanged: *unchanged,
                },
            )?,
            Event::GridWorkerAssigned {
                grid_code,
                worker,
                assigned_at_ms,
            } => to_bytes(
                event_type,
                &GridWorkerAssignedV1 {
                    grid_code: grid_code.clone(),
                    worker_id: worker.worker_id.clone(),
                    worker_name: worker.name.clone(),
                    assigned_at_ms: *assigned_at_ms,
                },
            )?,
        };
        Ok(EncodedEvent {
            event_type: event_type.to_owned(),
            schema_version: Self::SCHEMA_VERSION_CURRENT,
            payload,
        })
    }

    fn decode(
        &self,
        event_type: &str,
        schema_version: u16,
        payload: &[u8],
    ) -> Result<Event, CodecError> {
        use event_types::*;
        let event = match (event_type, schema_version) {
            (COMMUNITY_REGISTERED, 1) => {
                let v: CommunityRegisteredV1 = from_bytes(event_type, schema_version, payload)?;
                Event::CommunityRegistered {
                    profile: profile_from_v1(v.profile),
                    registered_at_ms: v.registered_at_ms,
                }
            }
            (COMMUNITY_UPDATED, 1) => {
                let v: CommunityUpdatedV1 = from_bytes(event_type, schema_version, payload)?;
                Event::CommunityUpdated {
                    profile: profile_from_v1(v.profile),
                }
            }
            (BUILDINGS_IMPORTED, 1) => {
                let v: BuildingsImportedV1 = from_bytes(event_type, schema_version, payload)?;
                Event::BuildingsImported {
                    buildings: v
                        .buildings
                        .into_iter()
                        .map(|b| Building {
                            id: b.id,
                            position: Point::new(b.lon, b.lat),
                            households: b.households,
                            population: b.population,
                        })
                        .collect(),
                    rejected: v
                        .rejected
                        .into_iter()
                        .map(|r| ItemRejection {
                            building_id: r.building_id,
                            reason_code: r.reason_code,
                            message: r.message,
                        })
                        .collect(),
                }
            }
            (GRIDS_DRAWN, 1) => {
                let v: GridsDrawnV1 = from_bytes(event_type, schema_version, payload)?;
                Event::GridsDrawn {
                    mode: match v.mode {
                        DrawModeV1::Full => DrawMode::Full,
                        DrawModeV1::Repair => DrawMode::Repair,
                    },
                    drawn: v.drawn.into_iter().map(grid_from_v1).collect(),
                    retired: v.retired,
                    unchanged: v.unchanged,
                }
            }
            (GRID_WORKER_ASSIGNED, 1) => {
                let v: GridWorkerAssignedV1 = from_bytes(event_type, schema_version, payload)?;
                Event::GridWorkerAssigned {
                    grid_code: v.grid_code,
                    worker: GridWorker {
                        worker_id: v.worker_id,
                        name: v.worker_name,
                    },
                    assigned_at_ms: v.assigned_at_ms,
                }
            }
            _ => {
                return Err(CodecError::UnknownType {
                    event_type: event_type.to_owned(),
                    schema_version,
                });
            }
        };
        Ok(event)
    }
}
