//! Data-driven partition tests: each case builds a community, partitions it, checks every
//! invariant (sizes or flags, connectivity, non-overlap + coverage, boundary containment,
//! membership) and snapshots a summary.

use expect_test::{Expect, expect};
use geo::{Area, BooleanOps, Coord, Intersects, LineString, MultiPolygon, Point, Polygon};
use partition::locate::{LocateIndex, Located};
use partition::synthetic::{self, SplitMix64};
use partition::{BuildingInput, CommunityInput, Partition, UnitInput};

const ORIGIN: Coord<f64> = Coord { x: 112.0, y: 27.7 };
const METRES_PER_DEGREE: f64 = 111_320.0;

fn lonlat(x_m: f64, y_m: f64) -> Coord<f64> {
    Coord {
        x: ORIGIN.x + x_m / (METRES_PER_DEGREE * ORIGIN.y.to_radians().cos()),
        y: ORIGIN.y + y_m / METRES_PER_DEGREE,
    }
}

fn square_community(side_m: f64, buildings: Vec<BuildingInput>) -> CommunityInput {
    let ring = vec![
        lonlat(0.0, 0.0),
        lonlat(side_m, 0.0),
        lonlat(side_m, side_m),
        lonlat(0.0, side_m),
        lonlat(0.0, 0.0),
    ];
    CommunityInput {
        id: "sq".into(),
        code: "431302001001".into(),
        boundary: MultiPolygon::new(vec![Polygon::new(LineString::new(ring), vec![])]),
        buildings,
    }
}

fn building(id: &str, x_m: f64, y_m: f64, households: u32, units: &[u32]) -> BuildingInput {
    BuildingInput {
        id: id.into(),
        position: Point(lonlat(x_m, y_m)),
        footprint: None,
        households,
        population: None,
        units: units
            .iter()
            .enumerate()
            .map(|(i, &h)| UnitInput {
                id: format!("{}", i + 1),
                households: h,
            })
            .collect(),
    }
}

/// Every invariant the issue names; returns the violations (empty when all hold).
fn violations(community: &CommunityInput, partition: &Partition) -> Vec<String> {
    let mut found = Vec::new();
    let boundary_area = community.boundary.unsigned_area();
    let mut sum = 0.0;
    for grid in &partition.grids {
        let area = grid.polygon.unsigned_area();
        sum += area;
        let inside = grid
            .polygon
            .intersection(&community.boundary)
            .unsigned_area();
        if (inside - area).abs() > 1e-6 * boundary_area {
            found.push(format!("{} crosses the boundary", grid.grid_code));
        }
        if !grid.detached.is_empty() {
            found.push(format!("{} is disconnected", grid.grid_code));
        }
        let in_range = (150..=250).contains(&grid.households);
        if !in_range && grid.flags.is_empty() {
            found.push(format!(
                "{} has {} households and no flag",
                grid.grid_code, grid.households
            ));
        }
        if grid.grid_code.len() != 15 || !grid.grid_code.starts_with(&community.code) {
            found.push(format!("{} is not community code + 3", grid.grid_code));
        }
    }
    let polygons: Vec<Polygon<f64>> = partition.grids.iter().map(|g| g.polygon.clone()).collect();
    let union = geo::unary_union(&polygons).unsigned_area();
    if (sum - boundary_area).abs() > 1e-6 * boundary_area {
        found.push(format!(
            "grid areas sum to {:.9} of the community",
            sum / boundary_area
        ));
    }
    if (union - boundary_area).abs() > 1e-6 * boundary_area {
        found.push(format!(
            "grids cover {:.9} of the community",
            union / boundary_area
        ));
    }
    // Membership: every building (or each of its units) in exactly one grid; a building
    // without units lies inside its grid.
    let mut seen = std::collections::HashMap::new();
    for grid in &partition.grids {
        for member in &grid.members {
            if seen.insert(member.clone(), grid).is_some() {
                found.push(format!("{member} is in two grids"));
            }
        }
    }
    for building in &community.buildings {
        if building.units.is_empty() {
            match seen.get(&building.id) {
                None => found.push(format!("{} is in no grid", building.id)),
                Some(grid) if !grid.polygon.intersects(&building.position) => {
                    found.push(format!("{} lies outside its grid", building.id))
                }
                Some(_) => {}
            }
        } else {
            for unit in &building.units {
                if !seen.contains_key(&format!("{}#{}", building.id, unit.id)) {
                    found.push(format!("{}#{} is in no grid", building.id, unit.id));
                }
            }
        }
    }
    found
}

fn summary(community: &CommunityInput, partition: &Partition, detail: bool) -> String {
    let q = &partition.quality;
    let mut out = format!(
        "buildings {} households {} grids {} in_range {} disconnected {} flagged {} pp_median {:.2} pp_p10 {:.2}\n",
        q.buildings,
        q.households,
        q.grids,
        q.in_range,
        q.disconnected,
        q.flagged,
        q.polsby_popper_quantile(0.5),
        q.polsby_popper_quantile(0.1)
    );
    if detail {
        for grid in &partition.grids {
            out += &format!(
                "{} {} [{}] {:?}\n",
                grid.grid_code,
                grid.households,
                grid.members.join(" "),
                grid.flags.iter().map(|f| f.as_str()).collect::<Vec<_>>()
            );
        }
    }
    let found = violations(community, partition);
    out += &if found.is_empty() {
        "invariants: ok\n".to_string()
    } else {
        format!("violations: {}\n", found.join("; "))
    };
    out
}

fn check(given: CommunityInput, detail: bool, expect: Expect) {
    let partition = partition::partition(&given).expect("partition");
    expect.assert_eq(&summary(&given, &partition, detail));
}

#[test]
fn synthetic_community_is_in_range_connected_and_compact() {
    let mut rng = SplitMix64::new(3);
    let given = synthetic::community(&mut rng, 0, Coord { x: 0.0, y: 0.0 }, 950.0, 2_000);
    check(
        given,
        false,
        expect![[r#"
            buildings 2000 households 39866 grids 199 in_range 199 disconnected 0 flagged 0 pp_median 0.53 pp_p10 0.36
            invariants: ok
        "#]],
    );
}

#[test]
fn small_community_is_one_flagged_grid() {
    let given = square_community(
        300.0,
        vec![
            building("a", 50.0, 50.0, 40, &[]),
            building("b", 250.0, 60.0, 30, &[]),
            building("c", 150.0, 200.0, 20, &[]),
        ],
    );
    check(
        given,
        true,
        expect![[r#"
            buildings 3 households 90 grids 1 in_range 0 disconnected 0 flagged 1 pp_median 0.79 pp_p10 0.79
            431302001001001 90 [a b c] ["small_community"]
            invariants: ok
        "#]],
    );
}

#[test]
fn oversize_building_gets_its_own_flagged_grid() {
    let mut buildings = vec![building("tower", 150.0, 150.0, 400, &[])];
    for i in 0..20 {
        buildings.push(building(
            &format!("h{i}"),
            20.0 + 13.0 * i as f64,
            40.0,
            10,
            &[],
        ));
    }
    check(
        square_community(300.0, buildings),
        true,
        expect![[r#"
            buildings 21 households 600 grids 2 in_range 1 disconnected 0 flagged 1 pp_median 0.75 pp_p10 0.57
            431302001001001 400 [tower] ["oversize_building"]
            431302001001002 200 [h0 h1 h10 h11 h12 h13 h14 h15 h16 h17 h18 h19 h2 h3 h4 h5 h6 h7 h8 h9] []
            invariants: ok
        "#]],
    );
}

#[test]
fn units_split_a_tower_but_never_a_unit() {
    let given = square_community(
        200.0,
        vec![building("t", 100.0, 100.0, 480, &[80, 80, 80, 80, 80, 80])],
    );
    check(
        given,
        true,
        expect![[r#"
        buildings 1 households 480 grids 2 in_range 2 disconnected 0 flagged 0 pp_median 0.60 pp_p10 0.60
        431302001001001 240 [t#1 t#2 t#3] []
        431302001001002 240 [t#4 t#5 t#6] []
        invariants: ok
    "#]],
    );
}

#[test]
fn indivisible_total_is_flagged() {
    let given = square_community(
        300.0,
        vec![
            building("a", 80.0, 80.0, 130, &[]),
            building("b", 220.0, 220.0, 130, &[]),
        ],
    );
    check(
        given,
        true,
        expect![[r#"
        buildings 2 households 260 grids 1 in_range 0 disconnected 0 flagged 1 pp_median 0.79 pp_p10 0.79
        431302001001001 260 [a b] ["indivisible_total"]
        invariants: ok
    "#]],
    );
}

#[test]
fn codes_run_west_to_east_then_north_to_south() {
    // Four clusters of 200 households: NW, NE, SW, SE.
    let mut buildings = Vec::new();
    for (name, cx, cy) in [
        ("sw", 100.0, 100.0),
        ("se", 300.0, 100.0),
        ("nw", 100.0, 300.0),
        ("ne", 300.0, 300.0),
    ] {
        for i in 0..4 {
            buildings.push(building(
                &format!("{name}{i}"),
                cx + 20.0 * (i % 2) as f64,
                cy + 20.0 * (i / 2) as f64,
                50,
                &[],
            ));
        }
    }
    check(
        square_community(400.0, buildings),
        true,
        expect![[r#"
        buildings 16 households 800 grids 4 in_range 4 disconnected 0 flagged 0 pp_median 0.77 pp_p10 0.77
        431302001001001 200 [nw0 nw1 nw2 nw3] []
        431302001001002 200 [ne0 ne1 ne2 ne3] []
        431302001001003 200 [sw0 sw1 sw2 sw3] []
        431302001001004 200 [se0 se1 se2 se3] []
        invariants: ok
    "#]],
    );
}

#[test]
fn localized_additions_move_few_buildings_and_keep_codes() {
    let mut rng = SplitMix64::new(11);
    let before = synthetic::community(&mut rng, 0, Coord { x: 0.0, y: 0.0 }, 950.0, 2_000);
    let first = partition::partition(&before).expect("partition");
    // 1% more buildings, all within 60 m of one spot.
    let mut after = before.clone();
    let spot = before.buildings[777].position.0;
    let mut extra = SplitMix64::new(99);
    for i in 0..20 {
        let mut b = before.buildings[(i * 37) % 2000].clone();
        b.id = format!("new{i}");
        b.units.clear();
        b.households = extra.range(3, 15);
        b.position = Point(Coord {
            x: spot.x + (extra.unit() - 0.5) * 0.0012,
            y: spot.y + (extra.unit() - 0.5) * 0.001,
        });
        if after.boundary.intersects(&b.position) {
            after.buildings.push(b);
        }
    }
    let second = partition::repartition(&after, &first.grids).expect("repartition");
    let grid_of = |p: &Partition| {
        p.grids
            .iter()
            .flat_map(|g| {
                g.members
                    .iter()
                    .map(move |m| (m.clone(), g.grid_code.clone()))
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (old, new) = (grid_of(&first), grid_of(&second));
    let moved = old
        .iter()
        .filter(|(m, code)| new.get(*m) != Some(code))
        .count();
    let changed_grids = first
        .grids
        .iter()
        .filter(|g| {
            !second.grids.iter().any(|h| {
                h.grid_code == g.grid_code
                    && h.members
                        .iter()
                        .filter(|m| !m.starts_with("new"))
                        .eq(g.members.iter())
            })
        })
        .count();
    let report = format!(
        "added {} moved {} of {} ({:.2}%) grids changed {} of {}\n{}",
        after.buildings.len() - before.buildings.len(),
        moved,
        old.len(),
        100.0 * moved as f64 / old.len() as f64,
        changed_grids,
        first.grids.len(),
        summary(&after, &second, false)
    );
    expect![[r#"
        added 20 moved 20 of 2312 (0.87%) grids changed 14 of 197
        buildings 2020 households 39491 grids 197 in_range 197 disconnected 0 flagged 0 pp_median 0.52 pp_p10 0.35
        invariants: ok
    "#]].assert_eq(&report);
}

#[test]
fn locate_finds_each_building_grid_and_says_unserved_outside() {
    let mut rng = SplitMix64::new(5);
    let community = synthetic::community(&mut rng, 0, Coord { x: 0.0, y: 0.0 }, 500.0, 300);
    let partition = partition::partition(&community).expect("partition");
    let index = LocateIndex::build(partition.grids.iter().map(|g| {
        (
            g.grid_code.clone(),
            g.community_id.clone(),
            g.polygon.clone(),
        )
    }))
    .expect("index");
    let mut wrong = 0;
    for grid in &partition.grids {
        for member in grid.members.iter().filter(|m| !m.contains('#')) {
            let b = community
                .buildings
                .iter()
                .find(|b| &b.id == member)
                .expect("building");
            match index.locate(b.position.x(), b.position.y()) {
                Located::Grid { grid_code, .. } if grid_code == grid.grid_code => {}
                _ => wrong += 1,
            }
        }
    }
    let outside = index.locate(0.0, 0.0);
    expect!["grids 32 wrong 0 outside Unserved"].assert_eq(&format!(
        "grids {} wrong {wrong} outside {outside:?}",
        index.len()
    ));
}
