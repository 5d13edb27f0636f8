//! The pure fold, deterministically: synthetic histories (decided by the real domain) folded
//! commit by commit, with snapshot expectations of the models, and the invariants the
//! service's crash safety rests on (incremental = recomputed; a redelivered commit changes
//! nothing).

use std::collections::BTreeMap;

use domain::IncidentEvent;
use eventstore::{AggregateId, CommitMeta, RecordedCommit, RecordedEvent};
use expect_test::{Expect, expect};
use projection::fold::{ModelKey, Projector};
use projection::synthetic::{PlannedCommit, Synthetic};
use projection::wire::ScoreWeights;

/// Histories interleaved one commit per incident per round, as stored commits.
fn recorded(histories: &[Vec<PlannedCommit>]) -> Vec<RecordedCommit<IncidentEvent>> {
    let mut out = Vec::new();
    let mut versions = vec![0u64; histories.len()];
    let rounds = histories.iter().map(Vec::len).max().unwrap_or(0);
    for round in 0..rounds {
        for (at, history) in histories.iter().enumerate() {
            let Some(planned) = history.get(round) else {
                continue;
            };
            let first_version = versions[at] + 1;
            versions[at] += planned.events.len() as u64;
            out.push(RecordedCommit {
                aggregate: AggregateId::new(planned.incident.0.hyphenated().to_string()).unwrap(),
                command_id: planned.command_id.clone(),
                sequence: out.len() as u64 + 1,
                first_version,
                version: versions[at],
                events: planned
                    .events
                    .iter()
                    .enumerate()
                    .map(|(i, event)| RecordedEvent {
                        event_id: uuid::Uuid::nil(),
                        version: first_version + i as u64,
                        event_type: projection::fold::event_name(event).to_owned(),
                        event: event.clone(),
                    })
                    .collect(),
                meta: CommitMeta {
                    correlation_id: uuid::Uuid::nil(),
                    causation_id: uuid::Uuid::nil(),
                    actor: planned.actor.clone(),
                    occurred_at_ms: planned.occurred_at_ms,
                    traceparent: None,
                },
                previous_hash: [0; 32],
                hash: [0; 32],
                stored_at_ms: planned.occurred_at_ms,
            });
        }
    }
    out
}

fn histories(seed: u64, incidents: u64) -> Vec<Vec<PlannedCommit>> {
    let mut synthetic = Synthetic::new(seed, Synthetic::default_grids(2, 2, 2));
    // Every third incident stops one commit short and every fifth three short, so some
    // stay open (boards, open counts).
    (0..incidents)
        .map(|n| {
            let mut history = synthetic.incident(n);
            let short = usize::from(n % 3 == 0) + 2 * usize::from(n % 5 == 0);
            history.truncate(history.len().saturating_sub(short).max(1));
            history
        })
        .collect()
}

fn fold(commits: &[RecordedCommit<IncidentEvent>], incremental: bool) -> Projector {
    let mut projector = Projector::new(ScoreWeights::default(), None, incremental);
    for commit in commits {
        projector.apply_incident_commit(commit);
    }
    if !incremental {
        projector.recompute_aggregates();
    }
    projector
}

/// Folds `incidents` synthetic incidents of `seed` and renders the models named by `keys`
/// (a key ending in `*` lists the keys it prefixes).
fn check(seed: u64, incidents: u64, keys: &[&str], expect: Expect) {
    let commits = recorded(&histories(seed, incidents));
    let models = fold(&commits, true).render_all();
    let mut out = format!("commits {}\n", commits.len());
    for key in keys {
        if *key == "boards" {
            let open: Vec<String> = models
                .iter()
                .filter(|(k, _)| k.starts_with("board."))
                .filter(|(_, v)| v["open"] != 0)
                .map(|(k, v)| format!("{}={} first={}", &k[6..], v["open"], v["entries"][0]))
                .collect();
            out.push_str(&format!("boards: {}\n", open.join("\n  ")));
        } else if let Some(prefix) = key.strip_suffix('*') {
            let listed: Vec<&str> = models
                .keys()
                .filter(|k| k.starts_with(prefix))
                .map(String::as_str)
                .collect();
            out.push_str(&format!("{key}: {}\n", listed.join(" ")));
        } else {
            out.push_str(&format!(
                "{key}: {}\n",
                serde_json::to_string(&models[*key]).unwrap()
            ));
        }
    }
    expect.assert_eq(&out);
}

#[test]
fn totals_scorecards_and_areas() {
    check(
        7,
        40,
        &[
            "totals",
            "scorecard.department.*",
            "scorecard.department.chengguan",
            "scorecard.street.350402001",
            "area.community.350402001001",
            "board.*",
            "boards",
        ],
        expect![[r#"
            commits 274
            totals: {"by_status":{"acknowledged":3,"closed":29,"rejected":1,"resolved":7},"deadlines":{"reports_late":3,"reports_missed":19,"reports_on_time":19,"resolution_late":8,"resolution_missed":11,"resolution_on_time":21,"response_late":11,"response_missed":12,"response_on_time":28},"incidents":40,"open":10,"sequence":274,"tally":{"assignments":41,"rated":11,"reported_late":3,"reported_on_time":19,"reports_missed":19,"resolution_missed":11,"resolved_late":8,"resolved_on_time":21,"responded_late":11,"responded_on_time":28,"response_missed":12,"returns":2,"satisfied":8,"summoned":49,"verification_failed":1},"whistles":[{"blown":5,"escalated":0,"kind":"routine","level":"community"},{"blown":10,"escalated":0,"kind":"routine","level":"street"},{"blown":0,"escalated":3,"kind":"tough","level":"district"},{"blown":0,"escalated":2,"kind":"tough","level":"city"},{"blown":4,"escalated":0,"kind":"emergency","level":"street"},{"blown":0,"escalated":4,"kind":"emergency","level":"district"},{"blown":0,"escalated":4,"kind":"emergency","level":"city"}]}
            scorecard.department.*: scorecard.department.chengguan scorecard.department.gongan scorecard.department.jiaojing scorecard.department.shengtai scorecard.department.shizheng scorecard.department.xiaofang scorecard.department.yingji scorecard.department.yuanlin scorecard.department.zhujian scorecard.department.ziranziyuan
            scorecard.department.chengguan: {"id":"chengguan","kind":"department","resolution_rate":1.0,"response_rate":1.0,"satisfaction_rate":null,"score":1.0,"sequence":274,"tally":{"assignments":1,"rated":0,"reported_late":0,"reported_on_time":3,"reports_missed":1,"resolution_missed":0,"resolved_late":0,"resolved_on_time":1,"responded_late":0,"responded_on_time":1,"response_missed":0,"returns":0,"satisfied":0,"summoned":7,"verification_failed":0},"weights":{"resolution":1.0,"response":1.0,"satisfaction":1.0}}
            scorecard.street.350402001: {"id":"350402001","kind":"street","resolution_rate":0.45,"response_rate":0.7,"satisfaction_rate":0.6666666666666666,"score":0.6055555555555555,"sequence":274,"tally":{"assignments":20,"rated":6,"reported_late":1,"reported_on_time":9,"reports_missed":7,"resolution_missed":7,"resolved_late":4,"resolved_on_time":9,"responded_late":5,"responded_on_time":14,"response_missed":6,"returns":1,"satisfied":4,"summoned":21,"verification_failed":0},"weights":{"resolution":1.0,"response":1.0,"satisfaction":1.0}}
            area.community.350402001001: {"by_status":{"acknowledged":1,"closed":8,"resolved":1},"code":"350402001001","incidents":10,"level":"community","open":2,"sequence":274,"tally":{"assignments":11,"rated":3,"reported_late":0,"reported_on_time":4,"reports_missed":0,"resolution_missed":2,"resolved_late":2,"resolved_on_time":6,"responded_late":1,"responded_on_time":9,"response_missed":2,"returns":1,"satisfied":2,"summoned":4,"verification_failed":0},"whistle_escalations":1,"whistles_blown":3}
            board.*: board.chengguan board.gongan board.jiaojing board.shengtai board.shizheng board.xiaofang board.yingji board.yuanlin board.zhujian board.ziranziyuan
            boards: chengguan=1 first={"category":"1105","emergency":false,"grid":"350402001002002","incident_id":"00000000-0000-0000-5eed-00000000001e","next_due":"2026-05-08T07:30:00Z","overdue":true,"role":"summoned","status":"acknowledged","whistle_level":"community"}
              zhujian=2 first={"category":"0301","emergency":false,"grid":"350402001001002","incident_id":"00000000-0000-0000-5eed-000000000000","next_due":"2026-05-12T03:46:00Z","overdue":false,"role":"handler","status":"acknowledged","whistle_level":null}
        "#]],
    );
}

#[test]
fn one_incident_view() {
    let commits = recorded(&histories(3, 5));
    let projector = fold(&commits, true);
    let incident = projection::fold::incident_of_aggregate(commits[0].aggregate.as_str()).unwrap();
    let view = projector.incident(incident).unwrap().view();
    expect![[r#"
        {
          "incident_id": "00000000-0000-0000-5eed-000000000000",
          "sequence": 16,
          "version": 4,
          "status": "acknowledged",
          "open": true,
          "grid": "350402002002001",
          "community": "350402002002",
          "street": "350402002",
          "category": "0303",
          "emergency": false,
          "handler": "department:zhujian",
          "response_due": null,
          "resolution_due": {
            "at": "2026-05-12T04:00:00Z",
            "at_ms": 1778558400000,
            "missed": false
          },
          "whistle": null,
          "whistles_blown": 0,
          "whistle_escalations": 0,
          "returned_by": [],
          "reopens": 0,
          "extensions_granted": 0,
          "rating": null,
          "reported_at": "2026-05-06T02:26:00Z",
          "updated_at": "2026-05-06T06:06:00Z",
          "commits": 4,
          "history": [
            {
              "sequence": 1,
              "version": 1,
              "at": "2026-05-06T02:26:00Z",
              "at_ms": 1778034360000,
              "actor": "resident/00000000-0000-0000-0000-000100000000",
              "events": [
                "reported"
              ]
            },
            {
              "sequence": 6,
              "version": 2,
              "at": "2026-05-06T03:49:00Z",
              "at_ms": 1778039340000,
              "actor": "system:synthetic",
              "events": [
                "filed"
              ]
            },
            {
              "sequence": 11,
              "version": 3,
              "at": "2026-05-06T04:45:00Z",
              "at_ms": 1778042700000,
              "actor": "system:synthetic",
              "events": [
                "dispatched"
              ]
            },
            {
              "sequence": 16,
              "version": 4,
              "at": "2026-05-06T06:06:00Z",
              "at_ms": 1778047560000,
              "actor": "department:zhujian/00000000-0000-0000-0000-000000000037",
              "events": [
                "acknowledged"
              ]
            }
          ]
        }"#]]
    .assert_eq(&serde_json::to_string_pretty(&view).unwrap());
}

#[test]
fn incremental_fold_equals_recomputed_sum() {
    let commits = recorded(&histories(11, 120));
    let incremental = fold(&commits, true).render_all();
    let recomputed = fold(&commits, false).render_all();
    assert_eq!(incremental.len(), recomputed.len());
    let differing: Vec<&String> = incremental
        .iter()
        .filter(|(key, value)| recomputed.get(*key) != Some(value))
        .map(|(key, _)| key)
        .collect();
    assert!(differing.is_empty(), "models differ: {differing:?}");
}

#[test]
fn redelivered_commits_change_nothing() {
    let commits = recorded(&histories(5, 60));
    let once = fold(&commits, true);
    let mut twice = fold(&commits, true);
    // A crash after a flush: everything up to the middle comes again, then the rest.
    let redelivered: Vec<_> = commits[commits.len() / 2..].iter().collect();
    let mut skipped = 0;
    for commit in redelivered {
        if twice.apply_incident_commit(commit) == projection::Applied::AlreadyReflected {
            skipped += 1;
        }
    }
    assert_eq!(skipped, commits.len() - commits.len() / 2);
    assert_eq!(once.render_all(), twice.render_all());
}

#[test]
fn restart_from_stored_incidents_equals_uninterrupted_fold() {
    let commits = recorded(&histories(9, 80));
    let cut = commits.len() / 3;
    let mut first = fold(&commits[..cut], true);
    let stored: BTreeMap<String, projection::StoredIncident> = first
        .take_dirty(false)
        .incidents
        .into_iter()
        .map(|(key, value)| (key, serde_json::from_slice(&value).unwrap()))
        .collect();
    // A new builder loads the incident values (JSON round trip), recomputes, follows on.
    let mut restarted = Projector::new(ScoreWeights::default(), None, true);
    for (_, incident) in stored {
        restarted.load_incident(incident.into_held());
    }
    restarted.recompute_aggregates();
    for commit in &commits {
        restarted.apply_incident_commit(commit);
    }
    assert_eq!(restarted.render_all(), fold(&commits, true).render_all());
    assert!(
        restarted.render(&ModelKey::Totals).is_some(),
        "totals are rendered"
    );
}

/// Deliveries lost on the way (every seventh commit), some coming back late, out of order: a
/// commit that does not follow its incident's last one is never folded; the incident is
/// folded afresh from its stored history instead, and the models end equal to the
/// in-order fold, with the checkpoint no further than the stream was followed.
#[test]
fn a_missing_commit_is_never_skipped_over() {
    let commits = recorded(&histories(13, 60));
    let mut projector = Projector::new(ScoreWeights::default(), None, true);
    let (lost, delivered): (Vec<_>, Vec<_>) = commits
        .iter()
        .enumerate()
        .partition(|(index, _)| index % 7 == 3);
    let history_of = |aggregate: &AggregateId, upto: usize| -> Vec<RecordedCommit<IncidentEvent>> {
        // What the store holds for the incident once `upto` commits were stored.
        commits[..upto]
            .iter()
            .filter(|c| &c.aggregate == aggregate)
            .cloned()
            .collect()
    };
    let mut gaps = 0;
    let mut followed = 0;
    for (index, commit) in delivered.iter().chain(lost.iter()) {
        followed = commit.sequence.max(followed);
        match projector.apply_incident_commit(commit) {
            projection::Applied::Gap {
                incident,
                held_version,
            } => {
                gaps += 1;
                assert!(held_version < commit.first_version - 1);
                // The store is ahead of what was delivered: everything up to now.
                let history = history_of(&commit.aggregate, commits.len().max(index + 1));
                assert_eq!(projector.replace_incident(incident, &history), vec![]);
                assert_eq!(projector.incidents_sequence(), followed);
            }
            projection::Applied::New | projection::Applied::AlreadyReflected => {}
            projection::Applied::Foreign => panic!("foreign {commit:?}"),
        }
    }
    assert!(gaps > 0, "the lost commits made gaps");
    assert_eq!(projector.render_all(), fold(&commits, true).render_all());
}

/// A stored history that does not fold from its first commit is data the builder cannot
/// change: its commits are handed back as skipped (the service logs and counts them) instead
/// of tripping an assertion the builder crashed on at every restart, and the other incidents'
/// models are those of a fold without it. Two such histories: an aggregate whose id names no
/// incident, with a first commit without `Reported` and a second one carrying it (the second
/// is a gap, and its history starts with a foreign commit); an incident whose first commit
/// is not in its history (every commit is a gap).
#[test]
fn a_history_that_does_not_fold_is_skipped_not_fatal() {
    let commits = recorded(&histories(21, 6));
    let aggregates: Vec<AggregateId> = commits.iter().map(|c| c.aggregate.clone()).collect();
    let (odd, headless) = (&aggregates[0], &aggregates[1]);
    let of = |aggregate: &AggregateId| -> Vec<RecordedCommit<IncidentEvent>> {
        commits
            .iter()
            .filter(|c| &c.aggregate == aggregate)
            .cloned()
            .collect()
    };
    let others: Vec<RecordedCommit<IncidentEvent>> = commits
        .iter()
        .filter(|c| &c.aggregate != odd && &c.aggregate != headless)
        .cloned()
        .collect();
    let legacy = AggregateId::new("legacy").unwrap();
    let mut odd_history = of(odd);
    odd_history.truncate(2);
    let reported = odd_history[0].events[0].clone();
    assert!(matches!(reported.event, IncidentEvent::Reported { .. }));
    for (n, commit) in odd_history.iter_mut().enumerate() {
        commit.aggregate = legacy.clone();
        commit.sequence = commits.len() as u64 + 1 + n as u64;
    }
    odd_history[0].events.remove(0);
    odd_history[1].events.insert(0, reported);
    let headless_history = of(headless)[1..].to_vec();

    let mut projector = Projector::new(ScoreWeights::default(), None, true);
    for commit in &others {
        projector.apply_incident_commit(commit);
    }
    let mut skipped = Vec::new();
    for history in [&odd_history, &headless_history] {
        for commit in history {
            if let projection::Applied::Gap { incident, .. } =
                projector.apply_incident_commit(commit)
            {
                let kinds: Vec<String> = projector
                    .replace_incident(incident, history)
                    .iter()
                    .map(|(sequence, applied)| match applied {
                        projection::Applied::Gap { held_version, .. } => {
                            format!("{sequence} gap after version {held_version}")
                        }
                        other => format!("{sequence} {other:?}"),
                    })
                    .collect();
                skipped.push(format!("{}: {}", commit.aggregate, kinds.join(", ")));
                break;
            }
        }
    }
    expect![[r#"
        legacy: 40 Foreign, 41 gap after version 0
        00000000-0000-0000-5eed-000000000001: 8 gap after version 0, 14 gap after version 0, 18 gap after version 0, 22 gap after version 0, 26 gap after version 0, 30 gap after version 0, 34 gap after version 0"#]].assert_eq(&skipped.join("\n"));
    // As if those commits had been delivered and not folded (the checkpoint passed them).
    let unfolded = [others, odd_history, headless_history].concat();
    assert_eq!(projector.render_all(), fold(&unfolded, true).render_all());
}

/// One GRIDS commit per registry command, decided by the registry's own core.
fn grids_commits(community_id: &str) -> Vec<RecordedCommit<registry::domain::Event>> {
    use geo::{LineString, MultiPolygon, Point, Polygon};
    use registry::domain::{Building, Command, Community, CommunityProfile, GridWorker};
    const STEP: f64 = 0.001;
    let (x, y) = (117.63, 26.26);
    let side = 4.0 * STEP;
    let profile = CommunityProfile {
        code: "350402001001".to_owned(),
        name: "列东社区".to_owned(),
        street: "列东街道".to_owned(),
        district: "三元区".to_owned(),
        boundary: MultiPolygon::new(vec![Polygon::new(
            LineString::from(vec![
                (x, y),
                (x + side, y),
                (x + side, y + side),
                (x, y + side),
                (x, y),
            ]),
            vec![],
        )]),
    };
    let buildings = (0..9)
        .map(|n| Building {
            id: format!("b{n}"),
            position: Point::new(
                x + (0.8 + f64::from(n % 3) * 1.2) * STEP,
                y + (0.8 + f64::from(n / 3) * 1.2) * STEP,
            ),
            households: 60,
            population: Some(180),
        })
        .collect();
    let mut community = Community::new(community_id);
    let mut commits = Vec::new();
    let mut commands = vec![
        Command::RegisterCommunity(profile),
        Command::ImportBuildings { buildings },
        Command::Partition,
    ];
    let mut version = 0;
    while !commands.is_empty() {
        let command = commands.remove(0);
        let events = registry::domain::decide(&community, "c", &command, 1_767_225_600_000)
            .expect("registry accepts the command");
        if matches!(command, Command::Partition) {
            let grid_code = community_grid(&community, &events);
            commands.push(Command::AssignGridWorker {
                grid_code,
                worker: GridWorker {
                    worker_id: "w1".to_owned(),
                    name: "网格员一".to_owned(),
                },
            });
        }
        for event in &events {
            registry::domain::evolve(&mut community, event);
        }
        let first_version = version + 1;
        version += events.len() as u64;
        commits.push(RecordedCommit {
            aggregate: AggregateId::new(community_id.to_owned()).unwrap(),
            command_id: format!("c{version}"),
            sequence: commits.len() as u64 + 1,
            first_version,
            version,
            events: events
                .into_iter()
                .enumerate()
                .map(|(i, event)| RecordedEvent {
                    event_id: uuid::Uuid::nil(),
                    version: first_version + i as u64,
                    event_type: event.kind().to_owned(),
                    event,
                })
                .collect(),
            meta: CommitMeta {
                correlation_id: uuid::Uuid::nil(),
                causation_id: uuid::Uuid::nil(),
                actor: "street/1".to_owned(),
                occurred_at_ms: 1_767_225_600_000,
                traceparent: None,
            },
            previous_hash: [0; 32],
            hash: [0; 32],
            stored_at_ms: 1_767_225_600_000,
        });
    }
    commits
}

/// The first grid code a partition commit draws.
fn community_grid(
    _community: &registry::domain::Community,
    events: &[registry::domain::Event],
) -> String {
    events
        .iter()
        .find_map(|event| match event {
            registry::domain::Event::GridsDrawn { drawn, .. } => {
                drawn.first().map(|grid| grid.grid_code.clone())
            }
            _ => None,
        })
        .expect("the partition draws grids")
}

#[test]
fn community_compliance_from_grids() {
    // Loudi's profile has grid and grid-worker rules (one worker per 200 households).
    let profile = standards::builtin("loudi").unwrap();
    let mut projector = Projector::new(ScoreWeights::default(), Some(profile), true);
    for commit in grids_commits("liedong") {
        projector.apply_grids_commit(&commit);
    }
    let rendered = projector.take_dirty(false);
    let (_, value) = rendered
        .models
        .iter()
        .find(|(key, _)| key == "compliance.liedong")
        .expect("a compliance value");
    let compliance: projection::CommunityCompliance = serde_json::from_slice(value).unwrap();
    let mut out = format!(
        "{} {} households={} grids={} workers={} met={} not_met={} unknown={} n/a={} seq={}\n",
        compliance.community_id,
        compliance.code,
        compliance.households,
        compliance.grids,
        compliance.grid_workers,
        compliance.met,
        compliance.not_met,
        compliance.unknown,
        compliance.not_applicable,
        compliance.sequence
    );
    for finding in &compliance.findings {
        out.push_str(&format!(
            "  {} {} actual={:?} ({})\n",
            finding.rule_id, finding.status, finding.actual, finding.source
        ));
    }
    expect![[r#"
        liedong 350402001001 households=540 grids=3 workers=1 met=1 not_met=0 unknown=11 n/a=0 seq=4
          grid_size met actual=Some(3.0) (002_5ec5a89cad8c6552.txt)
          committee_members unknown actual=None (002_5ec5a89cad8c6552.txt)
          staff_per_households unknown actual=None (002_5ec5a89cad8c6552.txt)
          public_service_space unknown actual=None (002_5ec5a89cad8c6552.txt)
          public_service_space_new unknown actual=None (002_5ec5a89cad8c6552.txt)
          service_centre unknown actual=None (002_5ec5a89cad8c6552.txt)
          operating_funds_central unknown actual=None (002_5ec5a89cad8c6552.txt)
          project_funds_central unknown actual=None (002_5ec5a89cad8c6552.txt)
          operating_funds_county_town unknown actual=None (002_5ec5a89cad8c6552.txt)
          project_funds_county_town unknown actual=None (002_5ec5a89cad8c6552.txt)
          operating_funds_township unknown actual=None (002_5ec5a89cad8c6552.txt)
          volunteers unknown actual=None (002_5ec5a89cad8c6552.txt)
    "#]]
    .assert_eq(&out);
}

/// Board order, as the board shows it: emergencies, then the higher whistle level, then
/// overdue, then the earliest open deadline (RFC 3339 UTC strings order as times do).
fn urgency_shown(
    entry: &serde_json::Value,
) -> (bool, std::cmp::Reverse<Option<usize>>, bool, String) {
    let level = entry["whistle_level"].as_str().map(|name| {
        ["grid", "community", "street", "district", "city"]
            .iter()
            .position(|known| *known == name)
            .expect("a known whistle level")
    });
    (
        !entry["emergency"].as_bool().expect("emergency"),
        std::cmp::Reverse(level),
        !entry["overdue"].as_bool().expect("overdue"),
        entry["next_due"].as_str().unwrap_or("~ none").to_owned(),
    )
}

#[test]
fn a_long_board_lists_its_most_urgent_cases_first() {
    let commits = recorded(&histories(13, 8_000));
    let incremental = fold(&commits, true).render_all();
    let recomputed = fold(&commits, false).render_all();
    let long: Vec<(&String, &serde_json::Value)> = incremental
        .iter()
        .filter(|(key, board)| {
            key.starts_with("board.")
                && board["open"].as_u64().expect("open")
                    > projection::fold::BOARD_ENTRIES_MAX as u64
        })
        .collect();
    let opens: Vec<String> = incremental
        .iter()
        .filter(|(key, _)| key.starts_with("board."))
        .map(|(key, board)| format!("{key}={}", board["open"]))
        .collect();
    assert!(
        !long.is_empty(),
        "some board has more open cases than it lists: {opens:?}"
    );
    for (key, board) in long {
        assert_eq!(
            Some(board),
            recomputed.get(key),
            "{key}: incremental = recomputed"
        );
        let entries = board["entries"].as_array().expect("entries");
        assert_eq!(entries.len(), projection::fold::BOARD_ENTRIES_MAX, "{key}");
        for pair in entries.windows(2) {
            assert!(
                urgency_shown(&pair[0]) <= urgency_shown(&pair[1]),
                "{key}: {} listed before {}",
                pair[0],
                pair[1]
            );
        }
    }
}
