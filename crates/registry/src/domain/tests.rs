use std::fmt::Write as _;

use expect_test::{Expect, expect};
use geo::{LineString, MultiPolygon, Point, Polygon};

use super::*;

const NOW_MS: i64 = 1_767_225_600_000;
/// South-west corner of the test community (Sanming, Fujian).
const ORIGIN: (f64, f64) = (117.6300, 26.2600);
/// Degrees per ~100 m at this latitude.
const STEP: f64 = 0.001;

fn square(side_steps: f64) -> MultiPolygon<f64> {
    let (x, y) = ORIGIN;
    let s = side_steps * STEP;
    MultiPolygon::new(vec![Polygon::new(
        LineString::from(vec![(x, y), (x + s, y), (x + s, y + s), (x, y + s), (x, y)]),
        vec![],
    )])
}

fn profile() -> CommunityProfile {
    CommunityProfile {
        code: "350402001001".to_owned(),
        name: "列东社区".to_owned(),
        street: "列东街道".to_owned(),
        district: "三元区".to_owned(),
        boundary: square(4.0),
    }
}

fn building(id: &str, column: f64, row: f64, households: u32) -> Building {
    Building {
        id: id.to_owned(),
        position: Point::new(ORIGIN.0 + column * STEP, ORIGIN.1 + row * STEP),
        households,
        population: Some(households * 3),
    }
}

/// Nine buildings of 60 households on a 3×3 lattice: 540 households, about three grids.
fn nine_buildings() -> Vec<Building> {
    let mut list = Vec::new();
    for row in 0..3 {
        for column in 0..3 {
            list.push(building(
                &format!("b{}", row * 3 + column + 1),
                0.8 + f64::from(column) * 1.2,
                0.8 + f64::from(row) * 1.2,
                60,
            ));
        }
    }
    list
}

fn register() -> (&'static str, Command) {
    ("c-register", Command::RegisterCommunity(profile()))
}

fn import_nine() -> (&'static str, Command) {
    (
        "c-import",
        Command::ImportBuildings {
            buildings: nine_buildings(),
        },
    )
}

/// Whether a grid's land holds every member's position (vertex counts are the engine's
/// business and change with it; covering the members is the registry's contract).
fn render_cover(grid: &GridRecord, buildings: &BTreeMap<String, Building>) -> String {
    let uncovered: Vec<&str> = grid
        .members
        .iter()
        .filter(|id| {
            let Some(building) = buildings.get(id.as_str()) else {
                return true;
            };
            !std::iter::once(&grid.polygon)
                .chain(&grid.detached)
                .any(|polygon| geo::Intersects::intersects(polygon, &building.position))
        })
        .map(String::as_str)
        .collect();
    if uncovered.is_empty() {
        "covers its members".to_owned()
    } else {
        format!("does NOT cover {uncovered:?}")
    }
}

fn render(event: &Event, buildings: &BTreeMap<String, Building>) -> String {
    let mut out = String::new();
    match event {
        Event::CommunityRegistered {
            profile,
            registered_at_ms,
        } => {
            let _ = write!(
                out,
                "community_registered {} {} {} {} boundary={} polygon(s) at={registered_at_ms}",
                profile.code,
                profile.name,
                profile.street,
                profile.district,
                profile.boundary.0.len()
            );
        }
        Event::CommunityUpdated { profile } => {
            let _ = write!(
                out,
                "community_updated {} {} {} {}",
                profile.code, profile.name, profile.street, profile.district
            );
        }
        Event::BuildingsImported {
            buildings,
            rejected,
        } => {
            let _ = write!(out, "buildings_imported");
            for b in buildings {
                let _ = write!(out, " +{}({})", b.id, b.households);
            }
            for r in rejected {
                let _ = write!(
                    out,
                    "\n  rejected {} {}: {}",
                    r.building_id, r.reason_code, r.message
                );
            }
        }
        Event::GridsDrawn {
            mode,
            drawn,
            retired,
            unchanged,
        } => {
            let _ = write!(
                out,
                "grids_drawn {mode:?} unchanged={unchanged} retired={retired:?}"
            );
            // Which building lands in which grid is the partition engine's decision (its own
            // tests snapshot it); the registry's contract is checked here: codes, flags, every
            // member covered by its grid's land, households adding up.
            for grid in drawn {
                let flags: Vec<&str> = grid.flags.iter().map(|f| f.as_str()).collect();
                let members_households: u32 = grid
                    .members
                    .iter()
                    .filter_map(|id| buildings.get(id.as_str()))
                    .map(|b| b.households)
                    .sum();
                let _ = write!(
                    out,
                    "\n  {} members={} households {} flags={flags:?} polygon {}",
                    grid.grid_code,
                    grid.members.len(),
                    if members_households == grid.households {
                        "add up"
                    } else {
                        "do NOT add up"
                    },
                    render_cover(grid, buildings)
                );
            }
            let total: u32 = drawn.iter().map(|g| g.households).sum();
            let _ = write!(out, "\n  households in drawn grids: {total}");
        }
        Event::GridWorkerAssigned {
            grid_code,
            worker,
            assigned_at_ms,
        } => {
            let _ = write!(
                out,
                "grid_worker_assigned {grid_code} {} {} at={assigned_at_ms}",
                worker.worker_id, worker.name
            );
        }
    }
    out
}

/// Applies `given` (each must be accepted), then decides `when` and snapshots the outcome.
fn check(given: &[(&str, Command)], when: (&str, Command), expect: Expect) {
    let mut community = Community::new("liedong");
    for (command_id, command) in given {
        let events = decide(&community, command_id, command, NOW_MS)
            .unwrap_or_else(|rejection| panic!("given {command_id} rejected: {rejection}"));
        for event in &events {
            evolve(&mut community, event);
        }
        community.note_command(command_id);
    }
    let actual = match decide(&community, when.0, &when.1, NOW_MS + 1) {
        Ok(events) if events.is_empty() => "no events (already applied)".to_owned(),
        Ok(events) => {
            let mut buildings = community.buildings.clone();
            for event in &events {
                if let Event::BuildingsImported { buildings: new, .. } = event {
                    for b in new {
                        buildings.insert(b.id.clone(), b.clone());
                    }
                }
            }
            events
                .iter()
                .map(|event| render(event, &buildings))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(rejection) => format!("rejected {}: {rejection}", rejection.reason_code()),
    };
    expect.assert_eq(&actual);
}

#[test]
fn register_community() {
    check(
        &[],
        register(),
        expect![
            "community_registered 350402001001 列东社区 列东街道 三元区 boundary=1 polygon(s) at=1767225600001"
        ],
    );
    check(
        &[register()],
        ("c-2", Command::RegisterCommunity(profile())),
        expect![
            "rejected already_registered: community liedong is already registered; use update_community"
        ],
    );
    check(
        &[register()],
        register(),
        expect!["no events (already applied)"],
    );
}

#[test]
fn register_refuses_bad_profiles() {
    let with = |change: fn(&mut CommunityProfile)| {
        let mut p = profile();
        change(&mut p);
        ("c-bad", Command::RegisterCommunity(p))
    };
    check(
        &[],
        with(|p| p.code = "35040200100".to_owned()),
        expect![[
            r#"rejected bad_code: community code "35040200100": must be 12 digits (district 6 + street 3 + community 3)"#
        ]],
    );
    check(
        &[],
        with(|p| p.code = "990402001001".to_owned()),
        expect![[
            r#"rejected bad_code: community code "990402001001": province prefix 99 is not a GB/T 2260 province"#
        ]],
    );
    check(
        &[],
        with(|p| p.code = "350400001001".to_owned()),
        expect![[
            r#"rejected bad_code: community code "350400001001": district part 350400 is a prefecture, not a county-level division"#
        ]],
    );
    check(
        &[],
        with(|p| p.code = "350402000001".to_owned()),
        expect![[r#"rejected bad_code: community code "350402000001": street part is 000"#]],
    );
    check(
        &[],
        with(|p| p.name = "  ".to_owned()),
        expect![[r#"rejected bad_name: name "  ": is empty"#]],
    );
    check(
        &[],
        with(|p| p.boundary = MultiPolygon::new(vec![])),
        expect!["rejected bad_boundary: boundary: has no polygon"],
    );
    check(
        &[],
        with(|p| {
            p.boundary = MultiPolygon::new(vec![Polygon::new(
                LineString::from(vec![(0.0, 0.0), (200.0, 0.0), (0.0, 1.0), (0.0, 0.0)]),
                vec![],
            )])
        }),
        expect![
            "rejected bad_boundary: boundary: has a position outside WGS84 lon -180..180, lat -90..90"
        ],
    );
}

#[test]
fn import_buildings_validates_each_item() {
    let mut batch = nine_buildings();
    batch.push(building("far", 9.0, 9.0, 10));
    batch.push(building("b1", 1.0, 1.0, 10));
    batch.push(building("bad id", 1.0, 1.0, 10));
    batch.push(building("huge", 1.0, 1.0, 9_000));
    check(
        &[register()],
        ("c-import", Command::ImportBuildings { buildings: batch }),
        expect![[r#"
            buildings_imported +b1(60) +b2(60) +b3(60) +b4(60) +b5(60) +b6(60) +b7(60) +b8(60) +b9(60)
              rejected far outside_boundary: position (117.639, 26.269000000000002) is outside the community boundary
              rejected b1 duplicate_in_batch: the batch holds this building id more than once
              rejected bad id bad_building_id: building id has ' '; only A-Z a-z 0-9 _ - are allowed
              rejected huge too_many_households: 9000 households, more than 5000"#]],
    );
    check(
        &[register(), import_nine()],
        (
            "c-again",
            Command::ImportBuildings {
                buildings: vec![building("b1", 0.8, 0.8, 60), building("x", 9.0, 9.0, 1)],
            },
        ),
        expect!["rejected nothing_to_import: nothing to import: 1 buildings unchanged, 1 rejected"],
    );
    check(
        &[],
        import_nine(),
        expect!["rejected not_registered: community liedong is not registered"],
    );
    check(
        &[register()],
        ("c-empty", Command::ImportBuildings { buildings: vec![] }),
        expect!["rejected batch_empty: import batch is empty"],
    );
    check(
        &[register()],
        (
            "c-big",
            Command::ImportBuildings {
                buildings: vec![building("b", 1.0, 1.0, 1); BUILDINGS_PER_BATCH_MAX + 1],
            },
        ),
        expect!["rejected batch_too_large: import batch has 2001 buildings, more than 2000"],
    );
}

#[test]
fn partition_draws_grids() {
    check(
        &[register(), import_nine()],
        ("c-partition", Command::Partition),
        expect![[r#"
            grids_drawn Full unchanged=0 retired=[]
              350402001001001 members=3 households add up flags=[] polygon covers its members
              350402001001002 members=3 households add up flags=[] polygon covers its members
              350402001001003 members=3 households add up flags=[] polygon covers its members
              households in drawn grids: 540"#]],
    );
    check(
        &[
            register(),
            import_nine(),
            ("c-partition", Command::Partition),
        ],
        ("c-partition-2", Command::Partition),
        expect![
            "rejected already_partitioned: community liedong already has grids; they are repaired on every change"
        ],
    );
}

#[test]
fn new_buildings_repair_grids_locally() {
    check(
        &[
            register(),
            import_nine(),
            ("c-partition", Command::Partition),
        ],
        (
            "c-more",
            Command::ImportBuildings {
                buildings: vec![building("b10", 3.5, 3.5, 90)],
            },
        ),
        expect![[r#"
            buildings_imported +b10(90)
            grids_drawn Repair unchanged=1 retired=[]
              350402001001001 members=4 households add up flags=[] polygon covers its members
              350402001001002 members=3 households add up flags=[] polygon covers its members
              households in drawn grids: 450"#]],
    );
}

#[test]
fn assign_grid_worker() {
    let worker = GridWorker {
        worker_id: "w-001".to_owned(),
        name: "王芳".to_owned(),
    };
    let partitioned = [
        register(),
        import_nine(),
        ("c-partition", Command::Partition),
    ];
    check(
        &partitioned,
        (
            "c-assign",
            Command::AssignGridWorker {
                grid_code: "350402001001001".to_owned(),
                worker: worker.clone(),
            },
        ),
        expect!["grid_worker_assigned 350402001001001 w-001 王芳 at=1767225600001"],
    );
    check(
        &partitioned,
        (
            "c-assign",
            Command::AssignGridWorker {
                grid_code: "350402001001999".to_owned(),
                worker: worker.clone(),
            },
        ),
        expect!["rejected unknown_grid: grid 350402001001999 is not a grid of community liedong"],
    );
    check(
        &partitioned,
        (
            "c-assign",
            Command::AssignGridWorker {
                grid_code: "350402001001001".to_owned(),
                worker: GridWorker {
                    worker_id: "w 1".to_owned(),
                    name: "王芳".to_owned(),
                },
            },
        ),
        expect![
            "rejected bad_worker: grid worker: worker id has ' '; only A-Z a-z 0-9 _ - are allowed"
        ],
    );
}

#[test]
fn update_community() {
    let mut renamed = profile();
    renamed.name = "列东新社区".to_owned();
    check(
        &[register()],
        ("c-update", Command::UpdateCommunity(renamed)),
        expect!["community_updated 350402001001 列东新社区 列东街道 三元区"],
    );
    check(
        &[register()],
        ("c-update", Command::UpdateCommunity(profile())),
        expect!["rejected no_change: update changes nothing"],
    );
    let mut recoded = profile();
    recoded.code = "350402001002".to_owned();
    check(
        &[
            register(),
            import_nine(),
            ("c-partition", Command::Partition),
        ],
        ("c-update", Command::UpdateCommunity(recoded)),
        expect![
            "rejected code_changed_after_partition: community code cannot change from 350402001001 to 350402001002 once grids are drawn (grid codes derive from it)"
        ],
    );
    let mut grown = profile();
    grown.boundary = square(5.0);
    check(
        &[
            register(),
            import_nine(),
            ("c-partition", Command::Partition),
        ],
        ("c-update", Command::UpdateCommunity(grown)),
        expect![[r#"
            community_updated 350402001001 列东社区 列东街道 三元区
            grids_drawn Repair unchanged=0 retired=[]
              350402001001001 members=3 households add up flags=[] polygon covers its members
              350402001001002 members=3 households add up flags=[] polygon covers its members
              350402001001003 members=3 households add up flags=[] polygon covers its members
              households in drawn grids: 540"#]],
    );
}

#[test]
fn command_ids_are_checked() {
    check(
        &[],
        ("", Command::Partition),
        expect![[
            r#"rejected bad_command_id: command id "": must be 1 to 128 bytes without control characters or white space at either end"#
        ]],
    );
    // White space at either end would be dropped when the commit's headers are read back.
    check(
        &[],
        ("imp-7 ", Command::Partition),
        expect![[
            r#"rejected bad_command_id: command id "imp-7 ": must be 1 to 128 bytes without control characters or white space at either end"#
        ]],
    );
}
