//! The community aggregate: a pure decider. `decide` turns a command into events or a typed
//! [`Rejection`]; `evolve` folds an event into the state. No IO, no clock (`now_ms` is an
//! input), no randomness: the same history and command always give the same events.
//!
//! Grids are always current: a command that changes what the grids are made of (new or changed
//! buildings, a new boundary) re-partitions the community in the same commit, with the
//! partition engine's local repair ([`partition::repartition`]), so grids that do not hold a
//! changed building keep their codes, members and grid workers.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use geo::{Intersects, MultiPolygon, Point, Polygon};
use partition::{BuildingInput, CommunityInput, Flag};

/// Longest community id (it becomes the tail of a NATS subject).
pub const COMMUNITY_ID_BYTES_MAX: usize = 64;
/// Longest command id (idempotency key).
pub const COMMAND_ID_BYTES_MAX: usize = 128;
/// Longest building id.
pub const BUILDING_ID_BYTES_MAX: usize = 64;
/// Longest grid worker id.
pub const WORKER_ID_BYTES_MAX: usize = 64;
/// Longest name (community, street, district, worker), in characters.
pub const NAME_CHARS_MAX: usize = 100;
/// Most buildings one import command may carry; bigger imports are split by the caller.
pub const BUILDINGS_PER_BATCH_MAX: usize = 2_000;
/// Most households one building may declare (the tallest towers hold a few thousand).
pub const HOUSEHOLDS_PER_BUILDING_MAX: u32 = 5_000;
/// Most residents one building may declare.
pub const POPULATION_PER_BUILDING_MAX: u32 = 20_000;
/// Command ids a community remembers to answer a redelivery as "already applied".
pub const COMMANDS_REMEMBERED_MAX: usize = 1_024;
/// Most vertices of a community boundary, as in the partition engine.
pub const BOUNDARY_VERTICES_MAX: usize = partition::BOUNDARY_VERTICES_MAX;

/// What a community is: its 12-digit code (district 6 per GB/T 2260 + street 3 + community 3),
/// names and boundary (WGS84 lon/lat).
#[derive(Debug, Clone, PartialEq)]
pub struct CommunityProfile {
    pub code: String,
    pub name: String,
    pub street: String,
    pub district: String,
    pub boundary: MultiPolygon<f64>,
}

/// A building as the registry keeps it. Units (单元) are not imported yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Building {
    pub id: String,
    pub position: Point<f64>,
    pub households: u32,
    pub population: Option<u32>,
}

/// A grid worker (网格员).
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct GridWorker {
    pub worker_id: String,
    pub name: String,
}

/// One grid as drawn by the partition engine.
#[derive(Debug, Clone, PartialEq)]
pub struct GridRecord {
    /// 15 digits: community code + 3-digit sequence.
    pub grid_code: String,
    pub households: u32,
    pub population: u32,
    /// Building ids, sorted.
    pub members: Vec<String>,
    pub flags: Vec<Flag>,
    pub polygon: Polygon<f64>,
    /// Parts of the grid's land cut off from `polygon` by a boundary notch.
    pub detached: Vec<Polygon<f64>>,
}

/// How grids were drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrawMode {
    /// From scratch (the first partition).
    Full,
    /// Local repair after a change: untouched grids keep code and members.
    Repair,
}

/// Why one building of an import batch was refused; the rest of the batch goes on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ItemRejection {
    pub building_id: String,
    pub reason_code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    CommunityRegistered {
        profile: CommunityProfile,
        registered_at_ms: i64,
    },
    CommunityUpdated {
        profile: CommunityProfile,
    },
    BuildingsImported {
        /// New or changed buildings (a building with a known id replaces the old one).
        buildings: Vec<Building>,
        rejected: Vec<ItemRejection>,
    },
    GridsDrawn {
        mode: DrawMode,
        /// New or changed grids.
        drawn: Vec<GridRecord>,
        /// Codes of grids that no longer exist; their workers are unassigned.
        retired: Vec<String>,
        /// Grids left exactly as they were.
        unchanged: u32,
    },
    GridWorkerAssigned {
        grid_code: String,
        worker: GridWorker,
        assigned_at_ms: i64,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::CommunityRegistered { .. } => "community_registered",
            Event::CommunityUpdated { .. } => "community_updated",
            Event::BuildingsImported { .. } => "buildings_imported",
            Event::GridsDrawn { .. } => "grids_drawn",
            Event::GridWorkerAssigned { .. } => "grid_worker_assigned",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    RegisterCommunity(CommunityProfile),
    UpdateCommunity(CommunityProfile),
    ImportBuildings {
        buildings: Vec<Building>,
    },
    Partition,
    AssignGridWorker {
        grid_code: String,
        worker: GridWorker,
    },
}

impl Command {
    /// True when deciding this command may draw grids (a partition, a boundary change of a
    /// partitioned community, or buildings imported into one, which the local repair then
    /// places): tens of milliseconds of work for a large community, which the service runs
    /// off its event loop.
    pub fn may_partition(&self) -> bool {
        matches!(
            self,
            Command::Partition | Command::UpdateCommunity(_) | Command::ImportBuildings { .. }
        )
    }
}

/// A business refusal. `reason_code` is stable for clients; the message explains.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("command id {command_id:?}: {reason}")]
    BadCommandId { command_id: String, reason: String },
    #[error("community id {community_id:?}: {reason}")]
    BadCommunityId {
        community_id: String,
        reason: String,
    },
    #[error("community {community_id} is not registered")]
    NotRegistered { community_id: String },
    #[error("community {community_id} is already registered; use update_community")]
    AlreadyRegistered { community_id: String },
    #[error("community code {code:?}: {reason}")]
    BadCode { code: String, reason: String },
    #[error("{field} {value:?}: {reason}")]
    BadName {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("boundary: {reason}")]
    BadBoundary { reason: String },
    #[error(
        "community code cannot change from {from} to {to} once grids are drawn (grid codes derive from it)"
    )]
    CodeChangedAfterPartition { from: String, to: String },
    #[error("update changes nothing")]
    NoChange,
    #[error("import batch is empty")]
    BatchEmpty,
    #[error("import batch has {items} buildings, more than {max}")]
    BatchTooLarge { items: usize, max: usize },
    #[error("nothing to import: {unchanged} buildings unchanged, {} rejected", rejected.len())]
    NothingToImport {
        unchanged: usize,
        rejected: Vec<ItemRejection>,
    },
    #[error("community {community_id} already has grids; they are repaired on every change")]
    AlreadyPartitioned { community_id: String },
    #[error("partition failed: {reason}")]
    PartitionFailed { reason: String },
    #[error("grid {grid_code} is not a grid of community {community_id}")]
    UnknownGrid {
        grid_code: String,
        community_id: String,
    },
    #[error("grid worker: {reason}")]
    BadWorker { reason: String },
    #[error("grid {grid_code} already has worker {worker_id}")]
    AlreadyAssigned {
        grid_code: String,
        worker_id: String,
    },
}

impl Rejection {
    /// Stable, machine-readable reason code.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Rejection::BadCommandId { .. } => "bad_command_id",
            Rejection::BadCommunityId { .. } => "bad_community_id",
            Rejection::NotRegistered { .. } => "not_registered",
            Rejection::AlreadyRegistered { .. } => "already_registered",
            Rejection::BadCode { .. } => "bad_code",
            Rejection::BadName { .. } => "bad_name",
            Rejection::BadBoundary { .. } => "bad_boundary",
            Rejection::CodeChangedAfterPartition { .. } => "code_changed_after_partition",
            Rejection::NoChange => "no_change",
            Rejection::BatchEmpty => "batch_empty",
            Rejection::BatchTooLarge { .. } => "batch_too_large",
            Rejection::NothingToImport { .. } => "nothing_to_import",
            Rejection::AlreadyPartitioned { .. } => "already_partitioned",
            Rejection::PartitionFailed { .. } => "partition_failed",
            Rejection::UnknownGrid { .. } => "unknown_grid",
            Rejection::BadWorker { .. } => "bad_worker",
            Rejection::AlreadyAssigned { .. } => "already_assigned",
        }
    }
}

/// The state of one community aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Community {
    pub id: String,
    pub profile: Option<CommunityProfile>,
    pub registered_at_ms: i64,
    pub buildings: BTreeMap<String, Building>,
    pub grids: BTreeMap<String, GridRecord>,
    /// Grid code → its worker.
    pub workers: BTreeMap<String, GridWorker>,
    /// The last [`COMMANDS_REMEMBERED_MAX`] command ids, oldest first.
    pub recent_commands: VecDeque<String>,
}

impl Community {
    pub fn new(id: impl Into<String>) -> Community {
        Community {
            id: id.into(),
            profile: None,
            registered_at_ms: 0,
            buildings: BTreeMap::new(),
            grids: BTreeMap::new(),
            workers: BTreeMap::new(),
            recent_commands: VecDeque::new(),
        }
    }

    pub fn households(&self) -> u64 {
        self.buildings
            .values()
            .map(|b| u64::from(b.households))
            .sum()
    }

    /// Total population, if every building declares one.
    pub fn population(&self) -> Option<u64> {
        self.buildings
            .values()
            .map(|b| b.population.map(u64::from))
            .sum()
    }

    /// Records that a commit made by `command_id` was applied (call once per commit).
    pub fn note_command(&mut self, command_id: &str) {
        if self.recent_commands.iter().any(|id| id == command_id) {
            return;
        }
        if self.recent_commands.len() >= COMMANDS_REMEMBERED_MAX {
            self.recent_commands.pop_front();
        }
        self.recent_commands.push_back(command_id.to_owned());
    }

    fn partition_input(
        &self,
        profile: &CommunityProfile,
        buildings: &BTreeMap<String, Building>,
    ) -> CommunityInput {
        CommunityInput {
            id: self.id.clone(),
            code: profile.code.clone(),
            boundary: profile.boundary.clone(),
            buildings: buildings
                .values()
                .map(|b| BuildingInput {
                    id: b.id.clone(),
                    position: b.position,
                    footprint: None,
                    households: b.households,
                    population: b.population,
                    units: Vec::new(),
                })
                .collect(),
        }
    }
}

/// Validates an id that becomes part of a subject or a key.
pub fn check_id(id: &str, bytes_max: usize) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".to_owned());
    }
    if id.len() > bytes_max {
        return Err(format!("is {} bytes, more than {bytes_max}", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(format!("has {c:?}; only A-Z a-z 0-9 _ - are allowed"));
    }
    Ok(())
}

/// Province-level prefixes of GB/T 2260 (mainland provinces, Taiwan, Hong Kong, Macao).
const PROVINCE_PREFIXES: [u8; 34] = [
    11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51, 52,
    53, 54, 61, 62, 63, 64, 65, 71, 81, 82,
];

/// Checks a 12-digit community code: a county-level GB/T 2260 division (6), a street (3) and a
/// community (3), none of them zero.
pub fn check_community_code(code: &str) -> Result<(), String> {
    if code.len() != 12 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be 12 digits (district 6 + street 3 + community 3)".to_owned());
    }
    let province: u8 = code[0..2].parse().expect("two digits");
    if !PROVINCE_PREFIXES.contains(&province) {
        return Err(format!(
            "province prefix {province:02} is not a GB/T 2260 province"
        ));
    }
    if &code[4..6] == "00" {
        return Err(format!(
            "district part {} is a prefecture, not a county-level division",
            &code[0..6]
        ));
    }
    if &code[6..9] == "000" {
        return Err("street part is 000".to_owned());
    }
    if &code[9..12] == "000" {
        return Err("community part is 000".to_owned());
    }
    Ok(())
}

fn check_name(field: &'static str, value: &str) -> Result<(), Rejection> {
    let reason = if value.trim().is_empty() {
        Some("is empty".to_owned())
    } else if value.chars().count() > NAME_CHARS_MAX {
        Some(format!("is longer than {NAME_CHARS_MAX} characters"))
    } else if value.chars().any(char::is_control) {
        Some("has control characters".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Rejection::BadName {
            field,
            value: value.chars().take(NAME_CHARS_MAX).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_boundary(boundary: &MultiPolygon<f64>) -> Result<(), Rejection> {
    let bad = |reason: &str| {
        Err(Rejection::BadBoundary {
            reason: reason.to_owned(),
        })
    };
    if boundary.0.is_empty() {
        return bad("has no polygon");
    }
    let mut vertices = 0usize;
    for polygon in &boundary.0 {
        if polygon.exterior().0.len() < 4 {
            return bad("a ring has fewer than 4 positions (3 corners and the closing one)");
        }
        for ring in std::iter::once(polygon.exterior()).chain(polygon.interiors()) {
            vertices += ring.0.len();
            for c in &ring.0 {
                let inside_wgs84 = (-180.0..=180.0).contains(&c.x) && (-90.0..=90.0).contains(&c.y);
                if !inside_wgs84 {
                    return bad("has a position outside WGS84 lon -180..180, lat -90..90");
                }
            }
        }
    }
    if vertices > BOUNDARY_VERTICES_MAX {
        return Err(Rejection::BadBoundary {
            reason: format!("has {vertices} vertices, more than {BOUNDARY_VERTICES_MAX}"),
        });
    }
    if geo::Area::unsigned_area(boundary) <= 0.0 {
        return bad("has no area");
    }
    Ok(())
}

fn check_profile(profile: &CommunityProfile) -> Result<(), Rejection> {
    check_community_code(&profile.code).map_err(|reason| Rejection::BadCode {
        code: profile.code.clone(),
        reason,
    })?;
    check_name("name", &profile.name)?;
    check_name("street", &profile.street)?;
    check_name("district", &profile.district)?;
    check_boundary(&profile.boundary)
}

fn item_rejection(building_id: &str, reason_code: &str, message: String) -> ItemRejection {
    ItemRejection {
        building_id: building_id.chars().take(BUILDING_ID_BYTES_MAX).collect(),
        reason_code: reason_code.to_owned(),
        message,
    }
}

fn check_building(building: &Building, boundary: &MultiPolygon<f64>) -> Result<(), ItemRejection> {
    let id = &building.id;
    check_id(id, BUILDING_ID_BYTES_MAX)
        .map_err(|reason| item_rejection(id, "bad_building_id", format!("building id {reason}")))?;
    let (x, y) = (building.position.x(), building.position.y());
    if !(x.is_finite() && y.is_finite()) {
        return Err(item_rejection(
            id,
            "bad_position",
            "position is not a finite lon/lat".to_owned(),
        ));
    }
    if !boundary.intersects(&building.position) {
        return Err(item_rejection(
            id,
            "outside_boundary",
            format!("position ({x}, {y}) is outside the community boundary"),
        ));
    }
    if building.households > HOUSEHOLDS_PER_BUILDING_MAX {
        return Err(item_rejection(
            id,
            "too_many_households",
            format!(
                "{} households, more than {HOUSEHOLDS_PER_BUILDING_MAX}",
                building.households
            ),
        ));
    }
    if let Some(population) = building.population
        && population > POPULATION_PER_BUILDING_MAX
    {
        return Err(item_rejection(
            id,
            "too_many_residents",
            format!("{population} residents, more than {POPULATION_PER_BUILDING_MAX}"),
        ));
    }
    Ok(())
}

fn grid_record(grid: partition::Grid) -> GridRecord {
    GridRecord {
        grid_code: grid.grid_code,
        households: grid.households,
        population: grid.population,
        members: grid.members,
        flags: grid.flags,
        polygon: grid.polygon,
        detached: grid.detached,
    }
}

/// Draws grids for `buildings` under `profile`: a full partition when `community` has no grids,
/// a local repair of its grids otherwise. Returns the `GridsDrawn` event.
fn draw(
    community: &Community,
    profile: &CommunityProfile,
    buildings: &BTreeMap<String, Building>,
) -> Result<Event, Rejection> {
    let input = community.partition_input(profile, buildings);
    let failed = |error: partition::PartitionError| Rejection::PartitionFailed {
        reason: error.to_string(),
    };
    let (mode, result) = if community.grids.is_empty() {
        (
            DrawMode::Full,
            partition::partition(&input).map_err(failed)?,
        )
    } else {
        let previous: Vec<partition::Grid> = community
            .grids
            .values()
            .map(|g| partition::Grid {
                grid_code: g.grid_code.clone(),
                community_id: community.id.clone(),
                households: g.households,
                population: g.population,
                members: g.members.clone(),
                flags: g.flags.clone(),
                polygon: g.polygon.clone(),
                detached: g.detached.clone(),
                polsby_popper: 0.0,
            })
            .collect();
        (
            DrawMode::Repair,
            partition::repartition(&input, &previous).map_err(failed)?,
        )
    };
    let mut drawn = Vec::new();
    let mut unchanged = 0u32;
    let mut kept: BTreeSet<String> = BTreeSet::new();
    for grid in result.grids {
        let record = grid_record(grid);
        kept.insert(record.grid_code.clone());
        if community.grids.get(&record.grid_code) == Some(&record) {
            unchanged += 1;
        } else {
            drawn.push(record);
        }
    }
    let retired = community
        .grids
        .keys()
        .filter(|code| !kept.contains(*code))
        .cloned()
        .collect();
    Ok(Event::GridsDrawn {
        mode,
        drawn,
        retired,
        unchanged,
    })
}

/// Decides what `command` (identified by `command_id`) does to `community` at `now_ms`.
/// A command id the community already applied yields no events (a redelivery).
pub fn decide(
    community: &Community,
    command_id: &str,
    command: &Command,
    now_ms: i64,
) -> Result<Vec<Event>, Rejection> {
    if command_id.is_empty()
        || command_id.len() > COMMAND_ID_BYTES_MAX
        || command_id.chars().any(char::is_control)
        || command_id.trim() != command_id
    {
        return Err(Rejection::BadCommandId {
            command_id: command_id.chars().take(COMMAND_ID_BYTES_MAX).collect(),
            reason: format!(
                "must be 1 to {COMMAND_ID_BYTES_MAX} bytes without control characters or white \
                 space at either end"
            ),
        });
    }
    check_id(&community.id, COMMUNITY_ID_BYTES_MAX).map_err(|reason| {
        Rejection::BadCommunityId {
            community_id: community.id.clone(),
            reason,
        }
    })?;
    if community.recent_commands.iter().any(|id| id == command_id) {
        return Ok(Vec::new());
    }
    let not_registered = || Rejection::NotRegistered {
        community_id: community.id.clone(),
    };
    match command {
        Command::RegisterCommunity(profile) => {
            if community.profile.is_some() {
                return Err(Rejection::AlreadyRegistered {
                    community_id: community.id.clone(),
                });
            }
            check_profile(profile)?;
            Ok(vec![Event::CommunityRegistered {
                profile: profile.clone(),
                registered_at_ms: now_ms,
            }])
        }
        Command::UpdateCommunity(profile) => {
            let current = community.profile.as_ref().ok_or_else(not_registered)?;
            check_profile(profile)?;
            if current == profile {
                return Err(Rejection::NoChange);
            }
            if current.code != profile.code && !community.grids.is_empty() {
                return Err(Rejection::CodeChangedAfterPartition {
                    from: current.code.clone(),
                    to: profile.code.clone(),
                });
            }
            let mut events = vec![Event::CommunityUpdated {
                profile: profile.clone(),
            }];
            if current.boundary != profile.boundary && !community.grids.is_empty() {
                events.push(draw(community, profile, &community.buildings)?);
            }
            Ok(events)
        }
        Command::ImportBuildings { buildings } => {
            let profile = community.profile.as_ref().ok_or_else(not_registered)?;
            if buildings.is_empty() {
                return Err(Rejection::BatchEmpty);
            }
            if buildings.len() > BUILDINGS_PER_BATCH_MAX {
                return Err(Rejection::BatchTooLarge {
                    items: buildings.len(),
                    max: BUILDINGS_PER_BATCH_MAX,
                });
            }
            let mut accepted: Vec<Building> = Vec::new();
            let mut rejected = Vec::new();
            let mut seen = BTreeSet::new();
            let mut unchanged = 0usize;
            for building in buildings {
                if !seen.insert(building.id.as_str()) {
                    rejected.push(item_rejection(
                        &building.id,
                        "duplicate_in_batch",
                        "the batch holds this building id more than once".to_owned(),
                    ));
                    continue;
                }
                if let Err(rejection) = check_building(building, &profile.boundary) {
                    rejected.push(rejection);
                    continue;
                }
                if community.buildings.get(&building.id) == Some(building) {
                    unchanged += 1;
                    continue;
                }
                accepted.push(building.clone());
            }
            if accepted.is_empty() {
                return Err(Rejection::NothingToImport {
                    unchanged,
                    rejected,
                });
            }
            let mut events = Vec::new();
            if !community.grids.is_empty() {
                let mut after = community.buildings.clone();
                for building in &accepted {
                    after.insert(building.id.clone(), building.clone());
                }
                events.push(draw(community, profile, &after)?);
            }
            events.insert(
                0,
                Event::BuildingsImported {
                    buildings: accepted,
                    rejected,
                },
            );
            Ok(events)
        }
        Command::Partition => {
            let profile = community.profile.as_ref().ok_or_else(not_registered)?;
            if !community.grids.is_empty() {
                return Err(Rejection::AlreadyPartitioned {
                    community_id: community.id.clone(),
                });
            }
            Ok(vec![draw(community, profile, &community.buildings)?])
        }
        Command::AssignGridWorker { grid_code, worker } => {
            if community.profile.is_none() {
                return Err(not_registered());
            }
            if !community.grids.contains_key(grid_code) {
                return Err(Rejection::UnknownGrid {
                    grid_code: grid_code.chars().take(32).collect(),
                    community_id: community.id.clone(),
                });
            }
            check_id(&worker.worker_id, WORKER_ID_BYTES_MAX).map_err(|reason| {
                Rejection::BadWorker {
                    reason: format!("worker id {reason}"),
                }
            })?;
            check_name("worker name", &worker.name)?;
            if community.workers.get(grid_code) == Some(worker) {
                return Err(Rejection::AlreadyAssigned {
                    grid_code: grid_code.clone(),
                    worker_id: worker.worker_id.clone(),
                });
            }
            Ok(vec![Event::GridWorkerAssigned {
                grid_code: grid_code.clone(),
                worker: worker.clone(),
                assigned_at_ms: now_ms,
            }])
        }
    }
}

/// Folds one event into the state.
pub fn evolve(community: &mut Community, event: &Event) {
    match event {
        Event::CommunityRegistered {
            profile,
            registered_at_ms,
        } => {
            community.profile = Some(profile.clone());
            community.registered_at_ms = *registered_at_ms;
        }
        Event::CommunityUpdated { profile } => community.profile = Some(profile.clone()),
        Event::BuildingsImported { buildings, .. } => {
            for building in buildings {
                community
                    .buildings
                    .insert(building.id.clone(), building.clone());
            }
        }
        Event::GridsDrawn { drawn, retired, .. } => {
            for code in retired {
                community.grids.remove(code);
                community.workers.remove(code);
            }
            for grid in drawn {
                community.grids.insert(grid.grid_code.clone(), grid.clone());
            }
        }
        Event::GridWorkerAssigned {
            grid_code, worker, ..
        } => {
            community.workers.insert(grid_code.clone(), worker.clone());
        }
    }
}

#[cfg(test)]
mod tests;
