//! Seeded synthetic communities for tests and benchmarks.
//!
//! Why here and not in a test helper: the `wangge bench partition` command and this crate's
//! tests must measure the same city, and the generator is pure (a seed in, communities out),
//! so it belongs with the other pure code. A tiny SplitMix64 keeps it dependency-free and
//! stable across library upgrades (a snapshot must not move because `rand` changed).

use geo::{Coord, LineString, MultiPolygon, Point, Polygon};

use crate::{BuildingInput, CommunityInput, UnitInput};

/// Upper bound on buildings in one synthetic city.
pub const CITY_BUILDINGS_MAX: usize = 20_000_000;
/// Metres per degree of latitude, as in the partition's projection.
const METRES_PER_DEGREE: f64 = 111_320.0;

/// SplitMix64: tiny, seeded, good enough for synthetic cities.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [low, high] (inclusive).
    pub fn range(&mut self, low: u32, high: u32) -> u32 {
        low + (self.next_u64() % u64::from(high - low + 1)) as u32
    }
}

/// Where the synthetic city sits (Loudi, Hunan).
const ORIGIN: Coord<f64> = Coord {
    x: 111.99,
    y: 27.70,
};

/// A household count as found in a mid-size Chinese city: mostly low-rise, some mid-rise,
/// a few high-rises with several units.
fn building(rng: &mut SplitMix64, id: String, position: Point<f64>) -> BuildingInput {
    let roll = rng.unit();
    let mut units = Vec::new();
    let households = if roll < 0.70 {
        rng.range(1, 12)
    } else if roll < 0.95 {
        rng.range(12, 48)
    } else {
        let count = rng.range(2, 6);
        for unit in 0..count {
            units.push(UnitInput {
                id: format!("{}", unit + 1),
                households: rng.range(18, 60),
            });
        }
        units.iter().map(|u| u.households).sum()
    };
    BuildingInput {
        id,
        position,
        footprint: None,
        households,
        population: Some(households * 3),
        units,
    }
}

/// One community of `buildings` buildings inside a `side`-metre cell whose south-west corner
/// is `corner` (metres from the origin). The boundary is an irregular octagon with a notch.
pub fn community(
    rng: &mut SplitMix64,
    index: usize,
    corner: Coord<f64>,
    side: f64,
    buildings: usize,
) -> CommunityInput {
    let kx = METRES_PER_DEGREE * ORIGIN.y.to_radians().cos();
    let to_lonlat = |c: Coord<f64>| Coord {
        x: ORIGIN.x + c.x / kx,
        y: ORIGIN.y + c.y / METRES_PER_DEGREE,
    };
    let jitter = |rng: &mut SplitMix64| (rng.unit() - 0.5) * side * 0.08;
    let s = side;
    let local = [
        (0.15, 0.02),
        (0.85, 0.03),
        (0.98, 0.2),
        (0.97, 0.8),
        (0.8, 0.98),
        (0.55, 0.97),
        (0.5, 0.75),
        (0.42, 0.97),
        (0.2, 0.98),
        (0.02, 0.82),
        (0.03, 0.2),
    ];
    let mut ring: Vec<Coord<f64>> = local
        .iter()
        .map(|&(x, y)| Coord {
            x: corner.x + x * s + jitter(rng),
            y: corner.y + y * s + jitter(rng),
        })
        .collect();
    ring.push(ring[0]);
    let boundary_local = Polygon::new(LineString::new(ring.clone()), vec![]);
    let boundary = Polygon::new(
        LineString::new(ring.iter().map(|c| to_lonlat(*c)).collect()),
        vec![],
    );
    let mut list = Vec::with_capacity(buildings);
    while list.len() < buildings {
        let at = Coord {
            x: corner.x + rng.unit() * s,
            y: corner.y + rng.unit() * s,
        };
        if !geo::Intersects::intersects(&boundary_local, &at) {
            continue;
        }
        let id = format!("c{index}b{}", list.len());
        list.push(building(rng, id, Point(to_lonlat(at))));
    }
    CommunityInput {
        id: format!("c{index}"),
        code: format!("431302{:03}{:03}", 1 + index / 999 % 999, 1 + index % 999),
        boundary: MultiPolygon::new(vec![boundary]),
        buildings: list,
    }
}

/// A seeded city of about `buildings` buildings in communities of `per_community` buildings,
/// laid out on a square lattice of 1-km-ish cells.
pub fn city(seed: u64, buildings: usize, per_community: usize) -> Vec<CommunityInput> {
    let buildings = buildings.min(CITY_BUILDINGS_MAX);
    let per_community = per_community.max(1);
    let communities = buildings.div_ceil(per_community);
    let columns = (communities as f64).sqrt().ceil() as usize;
    let side = (per_community as f64 * 450.0).sqrt();
    let mut rng = SplitMix64::new(seed);
    (0..communities)
        .map(|index| {
            let count = per_community.min(buildings - index * per_community);
            let corner = Coord {
                x: (index % columns) as f64 * side,
                y: (index / columns) as f64 * side,
            };
            community(&mut rng, index, corner, side, count)
        })
        .collect()
}
