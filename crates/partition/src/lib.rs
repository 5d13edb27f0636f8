//! partition: split a residential community into grids (网格) of about 200 households.
//!
//! Why a crate of its own: the partition is the one piece of wangge whose correctness is
//! geometric (grids must never cross a community boundary, overlap, leave holes or fall apart)
//! and whose stability matters to people (a grid worker keeps "their" grid when a building is
//! added next door). Keeping it pure — no clock, no IO, no randomness — makes every result
//! reproducible from its input, so the registry can re-derive or audit any grid, and tests can
//! snapshot it.
//!
//! How it works (see docs/PARTITION.md for the measured figures):
//! 1. Project the community to local metres; every building (or every unit, 单元, of a building
//!    that has units) is one weighted *item*; the boundary is sampled into zero-weight
//!    *territory* sites so that the cells near the boundary stay on their side of it.
//! 2. A Delaunay triangulation (spade) of all sites gives the adjacency graph (edges that leave
//!    the community are dropped) and, by duality, each site's Voronoi cell.
//! 3. First cut: items in Hilbert-curve order, cut into `k` runs of equal households; a
//!    balanced power diagram seeded by those runs competes with them (the better is kept).
//! 4. Repair: every grid keeps its heaviest connected component; the rest regrows onto
//!    neighbours. Refinement: boundary moves that lower the out-of-range penalty (and, for the
//!    Hilbert cut, Hartigan-style compactness moves), never disconnecting a grid.
//! 5. Each grid's polygon is the union of its sites' Voronoi cells, traced exactly from the
//!    triangulation (shared edges are bit-identical, so grids never overlap and leave no gap),
//!    then clipped to the community boundary.
//! 6. Grid codes: community code (12 digits) + 3-digit sequence, numbered in reading order
//!    (rows north to south, west to east inside a row). `repartition` keeps the codes of every
//!    grid it does not have to touch.
#![forbid(unsafe_code)]

mod geometry;
pub mod locate;
mod solver;
pub mod synthetic;

use geo::{MultiPolygon, Point, Polygon};
use serde::{Deserialize, Serialize};

pub use solver::{partition, repartition};

/// Households a grid aims at (Loudi: "200 households or 600 people").
pub const HOUSEHOLDS_TARGET: u32 = 200;
/// Lowest household count of an in-range grid.
pub const HOUSEHOLDS_MIN: u32 = 150;
/// Highest household count of an in-range grid.
pub const HOUSEHOLDS_MAX: u32 = 250;
/// Largest number of buildings one community may hold (a bound on work per call).
pub const BUILDINGS_PER_COMMUNITY_MAX: usize = 200_000;
/// Largest number of units one building may declare.
pub const UNITS_PER_BUILDING_MAX: usize = 200;
/// Grid sequence numbers have three digits.
pub const GRIDS_PER_COMMUNITY_MAX: usize = 999;
/// Largest number of vertices of a community boundary.
pub const BOUNDARY_VERTICES_MAX: usize = 100_000;
/// Widest community boundary (east-west or north-south, metres) partitioned. Far beyond any
/// residential community (社区, a few kilometres across); past it the local projection to
/// metres distorts and the work grows with the extent.
pub const COMMUNITY_EXTENT_MAX_METRES: f64 = 50_000.0;

/// One household-holding entrance of a building (单元). Grids may split a building between its
/// units but never split a unit.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitInput {
    pub id: String,
    pub households: u32,
}

/// A building: a position (WGS84 lon/lat), an optional footprint, its households.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildingInput {
    pub id: String,
    /// Representative point (the footprint's centroid when there is one).
    pub position: Point<f64>,
    pub footprint: Option<Polygon<f64>>,
    /// Households; when `units` is not empty this must be the sum of the units' households.
    pub households: u32,
    pub population: Option<u32>,
    pub units: Vec<UnitInput>,
}

/// A community (社区): its 12-digit code (district 6 + street 3 + community 3), its boundary
/// (WGS84 lon/lat) and its buildings.
#[derive(Debug, Clone, PartialEq)]
pub struct CommunityInput {
    pub id: String,
    pub code: String,
    pub boundary: MultiPolygon<f64>,
    pub buildings: Vec<BuildingInput>,
}

/// Why a grid is not a plain 150–250 household grid. Flags are never silent: each names why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    /// Holds an indivisible building or unit with more than `HOUSEHOLDS_MAX` households.
    OversizeBuilding,
    /// The whole community has fewer than `HOUSEHOLDS_MIN` households.
    SmallCommunity,
    /// The community total cannot be cut into in-range grids (e.g. 260 households: one grid
    /// is too big, two are too small).
    IndivisibleTotal,
    /// Local moves could not bring this grid into range (lumpy buildings, narrow shapes).
    OutOfRange,
    /// The grid's clipped polygon fell apart (a boundary notch cut its cells); the output
    /// polygon is its largest part and the report lists the rest.
    Disconnected,
    /// The community has no buildings: one grid covers it.
    NoBuildings,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::OversizeBuilding => "oversize_building",
            Flag::SmallCommunity => "small_community",
            Flag::IndivisibleTotal => "indivisible_total",
            Flag::OutOfRange => "out_of_range",
            Flag::Disconnected => "disconnected",
            Flag::NoBuildings => "no_buildings",
        }
    }
}

/// One grid of a partition.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// 15 digits: community code (12) + sequence (3).
    pub grid_code: String,
    pub community_id: String,
    pub households: u32,
    pub population: u32,
    /// Building ids; a unit of a split building is `building_id#unit_id`. Sorted.
    pub members: Vec<String>,
    pub flags: Vec<Flag>,
    /// The grid's area (WGS84), clipped to the community boundary.
    pub polygon: Polygon<f64>,
    /// Parts of the grid's area not connected to `polygon` (empty unless `Disconnected`).
    pub detached: Vec<Polygon<f64>>,
    /// Polsby–Popper compactness 4πA/P² of `polygon`, computed in local metres.
    pub polsby_popper: f64,
}

/// Quality figures of one partition (or a sum of several).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub buildings: usize,
    pub households: u64,
    pub grids: usize,
    pub in_range: usize,
    pub disconnected: usize,
    pub flagged: usize,
    /// Polsby–Popper of every grid, sorted ascending.
    pub polsby_popper: Vec<f64>,
}

impl Quality {
    pub fn of(grids: &[Grid], buildings: usize) -> Quality {
        let mut polsby_popper: Vec<f64> = grids.iter().map(|grid| grid.polsby_popper).collect();
        polsby_popper.sort_by(f64::total_cmp);
        Quality {
            buildings,
            households: grids.iter().map(|grid| u64::from(grid.households)).sum(),
            grids: grids.len(),
            in_range: grids
                .iter()
                .filter(|grid| (HOUSEHOLDS_MIN..=HOUSEHOLDS_MAX).contains(&grid.households))
                .count(),
            disconnected: grids
                .iter()
                .filter(|grid| !grid.detached.is_empty())
                .count(),
            flagged: grids.iter().filter(|grid| !grid.flags.is_empty()).count(),
            polsby_popper,
        }
    }

    pub fn merge(&mut self, other: &Quality) {
        self.buildings += other.buildings;
        self.households += other.households;
        self.grids += other.grids;
        self.in_range += other.in_range;
        self.disconnected += other.disconnected;
        self.flagged += other.flagged;
        self.polsby_popper.extend_from_slice(&other.polsby_popper);
        self.polsby_popper.sort_by(f64::total_cmp);
    }

    /// Share of grids within 150–250 households (1.0 when there are no grids).
    pub fn in_range_share(&self) -> f64 {
        if self.grids == 0 {
            1.0
        } else {
            self.in_range as f64 / self.grids as f64
        }
    }

    /// Polsby–Popper quantile `q` in [0, 1] (nearest rank); 0 when there are no grids.
    pub fn polsby_popper_quantile(&self, q: f64) -> f64 {
        if self.polsby_popper.is_empty() {
            return 0.0;
        }
        let rank = ((self.polsby_popper.len() - 1) as f64 * q).round() as usize;
        self.polsby_popper[rank.min(self.polsby_popper.len() - 1)]
    }
}

/// The grids of one community.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    pub community_id: String,
    pub grids: Vec<Grid>,
    pub quality: Quality,
}

/// Why a community could not be partitioned at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    #[error("community {community}: community code {code:?} is not 12 digits")]
    BadCommunityCode { community: String, code: String },
    #[error("community {community}: boundary is empty or has non-finite coordinates")]
    BadBoundary { community: String },
    #[error("community {community}: boundary has {vertices} vertices, more than {max}")]
    BoundaryTooLarge {
        community: String,
        vertices: usize,
        max: usize,
    },
    #[error("community {community}: {buildings} buildings, more than {max}")]
    TooManyBuildings {
        community: String,
        buildings: usize,
        max: usize,
    },
    #[error("community {community}: building {building}: {reason}")]
    BadBuilding {
        community: String,
        building: String,
        reason: String,
    },
    #[error("community {community}: would need {grids} grids, more than {max}")]
    TooManyGrids {
        community: String,
        grids: usize,
        max: usize,
    },
    #[error(
        "community {community}: boundary spans {extent_m} m, more than {max_m} m (a residential \
         community is a few kilometres across)"
    )]
    CommunityTooLarge {
        community: String,
        extent_m: u64,
        max_m: u64,
    },
    #[error("community {community}: triangulation failed: {reason}")]
    Triangulation { community: String, reason: String },
}
