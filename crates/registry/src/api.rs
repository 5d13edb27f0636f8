//! Public JSON messages of the registry's NATS subjects.

use geo::{Coord, LineString, MultiPolygon, Point, Polygon};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::{Building, Command, CommunityProfile, GridWorker, ItemRejection};

/// Locate a point: `grids.locate`.
pub const SUBJECT_LOCATE: &str = "grids.locate";
/// Commands: `grids.cmd.<command>`.
pub const SUBJECT_COMMANDS: &str = "grids.cmd.*";
pub const SUBJECT_COMMAND_PREFIX: &str = "grids.cmd.";
/// Community facts and compliance: `grids.query.community`.
pub const SUBJECT_QUERY_COMMUNITY: &str = "grids.query.community";
/// Largest request body accepted (the NATS default max payload).
pub const REQUEST_BYTES_MAX: usize = 1024 * 1024;

/// `{"lon": .., "lat": ..}` in WGS84 degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocateRequest {
    /// Longitude, -180..=180.
    #[schemars(range(min = -180, max = 180))]
    pub lon: f64,
    /// Latitude, -90..=90.
    #[schemars(range(min = -90, max = 90))]
    pub lat: f64,
}

/// `{"building_id": ".."}`: which grid holds this building (by grid membership)?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocateBuildingRequest {
    pub building_id: String,
}

/// The answer to a locate request, in process ([`crate::Locator`]) and on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum LocateAnswer {
    Served {
        /// Community id.
        community: String,
        community_code: String,
        community_name: String,
        grid_code: String,
        /// The grid's worker, if one is assigned.
        grid_worker: Option<GridWorker>,
        street: String,
        district: String,
    },
    /// No grid covers the point.
    Unserved,
    /// The request was not a valid point.
    Rejected {
        reason_code: String,
        message: String,
    },
}

impl LocateAnswer {
    pub fn rejected(reason_code: &str, message: impl Into<String>) -> LocateAnswer {
        LocateAnswer::Rejected {
            reason_code: reason_code.to_owned(),
            message: message.into(),
        }
    }
}

impl From<observe::refusal::Refusal> for LocateAnswer {
    fn from(refusal: observe::refusal::Refusal) -> LocateAnswer {
        LocateAnswer::rejected(refusal.reason_code, refusal.message)
    }
}

/// A generic refusal on any subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RejectedReply {
    pub status: String,
    /// A request that cannot be read: `malformed_json`, `schema_violation` or
    /// `payload_too_large` (as on every service's subjects); `unknown_subject`,
    /// `unknown_command`; `not_found` (a community query for an unregistered community);
    /// `command_id_reused`; `commit_too_large` (the command's commit is over the event store's
    /// bounds); else the command's business refusal (docs/REGISTRY.md lists them).
    pub reason_code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_items: Vec<ItemRejectionJson>,
}

impl RejectedReply {
    pub fn new(reason_code: &str, message: impl Into<String>) -> RejectedReply {
        RejectedReply {
            status: "rejected".to_owned(),
            reason_code: reason_code.to_owned(),
            message: message.into(),
            rejected_items: Vec::new(),
        }
    }
}

impl From<observe::refusal::Refusal> for RejectedReply {
    fn from(refusal: observe::refusal::Refusal) -> RejectedReply {
        RejectedReply::new(refusal.reason_code, refusal.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ItemRejectionJson {
    pub building_id: String,
    pub reason_code: String,
    pub message: String,
}

impl From<&ItemRejection> for ItemRejectionJson {
    fn from(r: &ItemRejection) -> ItemRejectionJson {
        ItemRejectionJson {
            building_id: r.building_id.clone(),
            reason_code: r.reason_code.clone(),
            message: r.message.clone(),
        }
    }
}

/// Every command carries its idempotency key and the community it addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandHeader {
    pub command_id: String,
    pub community_id: String,
    /// Who sends it, e.g. `staff:district-office/zhang`; defaults to `anonymous`.
    #[serde(default)]
    pub actor: Option<String>,
}

/// GeoJSON-style MultiPolygon coordinates: polygons → rings → [lon, lat].
pub type MultiPolygonCoordinates = Vec<Vec<Vec<[f64; 2]>>>;

/// `grids.cmd.register_community` and `grids.cmd.update_community`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommunityCommand {
    pub command_id: String,
    pub community_id: String,
    #[serde(default)]
    pub actor: Option<String>,
    /// 12 digits: district (GB/T 2260) 6 + street 3 + community 3.
    pub code: String,
    pub name: String,
    pub street: String,
    pub district: String,
    pub boundary: MultiPolygonCoordinates,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildingJson {
    pub id: String,
    pub lon: f64,
    pub lat: f64,
    pub households: u32,
    #[serde(default)]
    pub population: Option<u32>,
}

/// `grids.cmd.import_buildings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportBuildingsCommand {
    pub command_id: String,
    pub community_id: String,
    #[serde(default)]
    pub actor: Option<String>,
    pub buildings: Vec<BuildingJson>,
}

/// `grids.cmd.partition`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionCommand {
    pub command_id: String,
    pub community_id: String,
    #[serde(default)]
    pub actor: Option<String>,
}

/// `grids.cmd.assign_grid_worker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignGridWorkerCommand {
    pub command_id: String,
    pub community_id: String,
    #[serde(default)]
    pub actor: Option<String>,
    pub grid_code: String,
    pub worker_id: String,
    pub worker_name: String,
}

/// `grids.query.community`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommunityQuery {
    pub community_id: String,
}

/// A parsed command: its header and the domain command.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCommand {
    pub header: CommandHeader,
    pub command: Command,
}

fn multipolygon(coordinates: &MultiPolygonCoordinates) -> MultiPolygon<f64> {
    let ring = |positions: &Vec<[f64; 2]>| {
        LineString::new(
            positions
                .iter()
                .map(|&[x, y]| Coord { x, y })
                .collect::<Vec<_>>(),
        )
    };
    MultiPolygon::new(
        coordinates
            .iter()
            .filter(|rings| !rings.is_empty())
            .map(|rings| Polygon::new(ring(&rings[0]), rings[1..].iter().map(ring).collect()))
            .collect(),
    )
}

fn header(command_id: &str, community_id: &str, actor: &Option<String>) -> CommandHeader {
    CommandHeader {
        command_id: command_id.to_owned(),
        community_id: community_id.to_owned(),
        actor: actor.clone(),
    }
}

/// Parses the body of `grids.cmd.<name>`; the error is the refusal to send back.
pub fn parse_command(name: &str, body: &[u8]) -> Result<ParsedCommand, RejectedReply> {
    fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, RejectedReply> {
        let value = serde_json::from_slice(body).map_err(|error| {
            RejectedReply::from(observe::refusal::Refusal::from_json_error_in(&error, body))
        })?;
        observe::refusal::require_object("command", body).map_err(RejectedReply::from)?;
        Ok(value)
    }
    let parsed = match name {
        "register_community" | "update_community" => {
            let c: CommunityCommand = json(body)?;
            let profile = CommunityProfile {
                code: c.code,
                name: c.name,
                street: c.street,
                district: c.district,
                boundary: multipolygon(&c.boundary),
            };
            ParsedCommand {
                header: header(&c.command_id, &c.community_id, &c.actor),
                command: if name == "register_community" {
                    Command::RegisterCommunity(profile)
                } else {
                    Command::UpdateCommunity(profile)
                },
            }
        }
        "import_buildings" => {
            let c: ImportBuildingsCommand = json(body)?;
            ParsedCommand {
                header: header(&c.command_id, &c.community_id, &c.actor),
                command: Command::ImportBuildings {
                    buildings: c
                        .buildings
                        .into_iter()
                        .map(|b| Building {
                            id: b.id,
                            position: Point::new(b.lon, b.lat),
                            households: b.households,
                            population: b.population,
                        })
                        .collect(),
                },
            }
        }
        "partition" => {
            let c: PartitionCommand = json(body)?;
            ParsedCommand {
                header: header(&c.command_id, &c.community_id, &c.actor),
                command: Command::Partition,
            }
        }
        "assign_grid_worker" => {
            let c: AssignGridWorkerCommand = json(body)?;
            ParsedCommand {
                header: header(&c.command_id, &c.community_id, &c.actor),
                command: Command::AssignGridWorker {
                    grid_code: c.grid_code,
                    worker: GridWorker {
                        worker_id: c.worker_id,
                        name: c.worker_name,
                    },
                },
            }
        }
        other => {
            return Err(RejectedReply::new(
                "unknown_command",
                format!(
                    "unknown command {other:?}; known: register_community, update_community, import_buildings, partition, assign_grid_worker"
                ),
            ));
        }
    };
    Ok(parsed)
}

/// A drawn or kept grid in a receipt or a query answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GridSummary {
    pub grid_code: String,
    pub households: u32,
    pub flags: Vec<String>,
    #[serde(default)]
    pub grid_worker: Option<GridWorker>,
}

/// The answer to an accepted command: sent only after the commit is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Receipt {
    /// Always `accepted`.
    pub status: String,
    pub command_id: String,
    pub community_id: String,
    /// True when this command id was already applied: nothing new was written.
    pub duplicate: bool,
    /// Aggregate version after the command.
    pub version: u64,
    /// Stream sequence of the commit (0 when a duplicate was answered from memory).
    pub sequence: u64,
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buildings_imported: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_items: Vec<ItemRejectionJson>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grids_drawn: Vec<GridSummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grids_retired: Vec<String>,
}

/// `grids.query.community` answer: the community's facts, its grids and its check against the
/// city's community standards.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct CommunityAnswer {
    /// `found`.
    pub status: String,
    pub community_id: String,
    pub code: String,
    pub name: String,
    pub street: String,
    pub district: String,
    pub buildings: usize,
    pub households: u64,
    pub population: Option<u64>,
    pub grids: Vec<GridSummary>,
    pub grid_workers: usize,
    pub version: u64,
    pub compliance: standards::ComplianceReport,
}

/// The JSON Schemas of the registry's public messages, by file stem
/// (`schemas/<stem>.schema.json`).
pub fn schemas() -> Vec<(&'static str, schemars::schema::RootSchema)> {
    use schemars::schema_for;
    vec![
        ("registry_locate", schema_for!(LocateRequest)),
        (
            "registry_locate_building",
            schema_for!(LocateBuildingRequest),
        ),
        ("registry_locate_answer", schema_for!(LocateAnswer)),
        ("registry_community_command", schema_for!(CommunityCommand)),
        (
            "registry_import_buildings_command",
            schema_for!(ImportBuildingsCommand),
        ),
        ("registry_partition_command", schema_for!(PartitionCommand)),
        (
            "registry_assign_grid_worker_command",
            schema_for!(AssignGridWorkerCommand),
        ),
        ("registry_command_receipt", schema_for!(Receipt)),
        ("registry_rejected_reply", schema_for!(RejectedReply)),
        ("registry_community_query", schema_for!(CommunityQuery)),
        ("registry_community_answer", schema_for!(CommunityAnswer)),
    ]
}
