//! Communities checked against the five seed cities' profiles.
//!
//! `check` snapshots the whole report of one community; the `*_figures` tests pin the figures
//! read from each document at the band boundaries, so a profile edit that drifts from the text
//! fails loudly.

use expect_test::{Expect, expect};
use standards::{Bounds, CommunityFacts, Status, builtin, evaluate};

/// Evaluates `facts` (JSON, as the registry and the CLI carry them) against `city`'s profile.
fn check(city: &str, facts: &str, expect: Expect) {
    let profile = builtin(city).expect("embedded profile");
    let facts: CommunityFacts = serde_json::from_str(facts).expect("facts JSON");
    facts.validate().expect("valid facts");
    expect.assert_eq(&evaluate(&profile, &facts).table());
}

/// The bounds `rule_id` requires of a community with these facts, and its status.
fn rule_outcome(city: &str, rule_id: &str, facts: &CommunityFacts) -> (Option<Bounds>, Status) {
    let profile = builtin(city).expect("embedded profile");
    let report = evaluate(&profile, facts);
    let finding = report
        .findings
        .iter()
        .find(|finding| finding.rule_id == rule_id)
        .unwrap_or_else(|| panic!("{city} has no rule {rule_id}"));
    let bounds = finding.required.as_ref().map(|required| required.any_of[0]);
    (bounds, finding.status)
}

fn min_for_households(city: &str, rule_id: &str, households: u32) -> Option<f64> {
    rule_outcome(city, rule_id, &CommunityFacts::with_households(households))
        .0
        .and_then(|bounds| bounds.min)
}

fn range_for_households(city: &str, rule_id: &str, households: u32) -> (Option<f64>, Option<f64>) {
    let bounds = rule_outcome(city, rule_id, &CommunityFacts::with_households(households))
        .0
        .expect("requirement computable from households");
    (bounds.min, bounds.max)
}

fn status_with(city: &str, rule_id: &str, facts: CommunityFacts) -> Status {
    rule_outcome(city, rule_id, &facts).1
}

#[test]
fn wuhan_figures() {
    // 1500户以下 ≥2000元/月, 1500~2500户 ≥2500元/月, 2500户以上 ≥3000元/月.
    let monthly = |households| {
        min_for_households("wuhan", "work_funds_by_size", households).map(|yearly| yearly / 12.0)
    };
    assert_eq!(
        [1, 1499, 1500, 2500, 2501, 9000].map(monthly),
        [2000.0, 2000.0, 2500.0, 2500.0, 3000.0, 3000.0].map(Some)
    );
    // 每100户20平方米, 最低不得少于200平方米.
    let space = |households| min_for_households("wuhan", "activity_space", households);
    assert_eq!(
        [1, 999, 1000, 1001, 1500, 2500].map(space),
        [200.0, 200.0, 200.0, 200.2, 300.0, 500.0].map(Some)
    );
    // 中心城区每个社区不得超过5人, 远城区每个社区不得超过4人.
    let central = CommunityFacts {
        district: Some(standards::DistrictKind::Central),
        ..CommunityFacts::with_households(1000)
    };
    let outer = CommunityFacts {
        district: Some(standards::DistrictKind::Outer),
        ..central.clone()
    };
    for (facts, staff, rule_id, status) in [
        (&central, 5, "station_staff_cap_central", Status::Met),
        (&central, 6, "station_staff_cap_central", Status::NotMet),
        (
            &central,
            5,
            "station_staff_cap_outer",
            Status::NotApplicable,
        ),
        (&outer, 4, "station_staff_cap_outer", Status::Met),
        (&outer, 5, "station_staff_cap_outer", Status::NotMet),
        (
            &outer,
            5,
            "station_staff_cap_central",
            Status::NotApplicable,
        ),
    ] {
        let facts = CommunityFacts {
            service_station_staff: Some(staff),
            ..facts.clone()
        };
        assert_eq!(
            status_with("wuhan", rule_id, facts),
            status,
            "{rule_id} {staff}"
        );
    }
    // 党员每人每年定额补贴50元.
    let party = CommunityFacts {
        party_members: Some(40),
        ..CommunityFacts::with_households(1000)
    };
    assert_eq!(
        rule_outcome("wuhan", "party_funds", &party)
            .0
            .and_then(|b| b.min),
        Some(2000.0)
    );
}

#[test]
fn hangzhou_figures() {
    // 新建的社区, 要严格按照1500-2000户左右规模进行设置.
    let new_size = |households| {
        let facts = CommunityFacts {
            newly_built: Some(true),
            ..CommunityFacts::with_households(households)
        };
        status_with("hangzhou", "new_community_size", facts)
    };
    assert_eq!(
        [1499, 1500, 2000, 2001].map(new_size),
        [Status::NotMet, Status::Met, Status::Met, Status::NotMet]
    );
    let existing = CommunityFacts {
        newly_built: Some(false),
        ..CommunityFacts::with_households(900)
    };
    assert_eq!(
        status_with("hangzhou", "new_community_size", existing),
        Status::NotApplicable
    );
    // 每百户30平方米.
    let space = |households| min_for_households("hangzhou", "activity_space", households);
    assert_eq!([100, 1000, 1550].map(space), [30.0, 300.0, 465.0].map(Some));
    // 志愿者人数 ... 从目前占城市人口的5%逐步扩大到8%: 5% is no longer enough, 8% is.
    let volunteers = |count| {
        let facts = CommunityFacts {
            population: Some(10_000),
            volunteers: Some(count),
            ..CommunityFacts::with_households(3000)
        };
        status_with("hangzhou", "volunteers", facts)
    };
    assert_eq!(
        [500, 799, 800].map(volunteers),
        [Status::NotMet, Status::NotMet, Status::Met]
    );
}

#[test]
fn loudi_figures() {
    // 按200户或600人左右的规模将社区划分为若干个网格单元.
    let grids = |households| range_for_households("loudi", "grid_size", households);
    assert_eq!(
        [1, 199, 200, 201, 1000, 1100].map(grids),
        [(1, 1), (1, 1), (1, 1), (1, 2), (5, 5), (5, 6)]
            .map(|(low, high)| (Some(f64::from(low)), Some(f64::from(high))))
    );
    // ... or 600 people: 1000 households / 2400 people allow 4 (by people) or 5 (by households).
    let grid_status = |grid_count| {
        let facts = CommunityFacts {
            population: Some(2400),
            grids: Some(grid_count),
            ..CommunityFacts::with_households(1000)
        };
        status_with("loudi", "grid_size", facts)
    };
    assert_eq!(
        [3, 4, 5, 6].map(grid_status),
        [Status::NotMet, Status::Met, Status::Met, Status::NotMet]
    );
    // Without population, a count that fails by households might still pass by people.
    let no_population = CommunityFacts {
        grids: Some(4),
        ..CommunityFacts::with_households(1000)
    };
    assert_eq!(
        status_with("loudi", "grid_size", no_population),
        Status::Unknown
    );
    // 每200户常住人口配1名工作人员 ... 5–7名.
    let staff = |households| min_for_households("loudi", "staff_per_households", households);
    assert_eq!(
        [1, 999, 1000, 1001, 1200, 1201, 1400, 5000].map(staff),
        [5.0, 5.0, 5.0, 6.0, 6.0, 7.0, 7.0, 7.0].map(Some)
    );
    // “两委”班子成员总数控制在5-7人.
    let committee = |members| {
        let facts = CommunityFacts {
            committee_members: Some(members),
            ..CommunityFacts::with_households(1000)
        };
        status_with("loudi", "committee_members", facts)
    };
    assert_eq!(
        [4, 5, 7, 8].map(committee),
        [Status::NotMet, Status::Met, Status::Met, Status::NotMet]
    );
    // 不低于400平方米; 新建 不低于600平方米; 社区服务中心 不少于50平方米.
    assert_eq!(
        min_for_households("loudi", "public_service_space", 10),
        Some(400.0)
    );
    assert_eq!(
        min_for_households("loudi", "public_service_space_new", 10),
        Some(600.0)
    );
    assert_eq!(
        min_for_households("loudi", "service_centre", 10),
        Some(50.0)
    );
    // 中心城区 25万元、20万元; 其它县(市)城区 20万元、10万元; 乡镇 15万元.
    assert_eq!(
        min_for_households("loudi", "operating_funds_central", 10),
        Some(250_000.0)
    );
    assert_eq!(
        min_for_households("loudi", "project_funds_central", 10),
        Some(200_000.0)
    );
    assert_eq!(
        min_for_households("loudi", "operating_funds_county_town", 10),
        Some(200_000.0)
    );
    assert_eq!(
        min_for_households("loudi", "project_funds_county_town", 10),
        Some(100_000.0)
    );
    assert_eq!(
        min_for_households("loudi", "operating_funds_township", 10),
        Some(150_000.0)
    );
    // 志愿者人数逐步达到社区居民总数的15%以上.
    let volunteers = |population| {
        let facts = CommunityFacts {
            population: Some(population),
            ..CommunityFacts::with_households(300)
        };
        rule_outcome("loudi", "volunteers", &facts)
            .0
            .and_then(|b| b.min)
    };
    assert_eq!(
        [1000, 1001, 3000].map(volunteers),
        [150.0, 151.0, 450.0].map(Some)
    );
}

#[test]
fn yixing_figures() {
    // 三者總數按“不低于每200戶配1名”的標準配備.
    let staff = |households| min_for_households("yixing", "staff_per_households", households);
    assert_eq!(
        [1, 200, 201, 1000, 1001, 3000].map(staff),
        [1.0, 1.0, 2.0, 5.0, 6.0, 15.0].map(Some)
    );
}

#[test]
fn sanming_figures() {
    // 1000户以下 5―7名; 1000户至3000户 7―9人; 超过3000户 可适当增加1―2人, 最多不超过11人.
    let staff = |households| range_for_households("sanming", "staff_by_size", households);
    assert_eq!(
        [1, 999, 1000, 3000, 3001, 20_000].map(staff),
        [(5, 7), (5, 7), (7, 9), (7, 9), (7, 11), (7, 11)]
            .map(|(low, high)| (Some(f64::from(low)), Some(f64::from(high))))
    );
    // 每个社区每年工作经费不低于10万元; 面积不低于600平方米.
    assert_eq!(
        min_for_households("sanming", "work_funds", 10),
        Some(100_000.0)
    );
    assert_eq!(
        min_for_households("sanming", "service_space", 10),
        Some(600.0)
    );
}

#[test]
fn reports() {
    check(
        "wuhan",
        r#"{"households": 1800, "district": "central", "service_station_staff": 5,
            "party_members": 60, "party_funds_yuan_per_year": 2500,
            "work_funds_yuan_per_year": 30000, "activity_space_m2": 300}"#,
        expect![[r#"
            rule                       status   required                                                           actual  reason
            station_staff_cap_central  met      ≤ 5 people                                                         5
            station_staff_cap_outer    n/a      -                                                                  5       rule is for outer/township districts, community is central
            party_funds                not met  ≥ 3000 yuan/year (50 per party member)                             2500
            work_funds_by_size         met      ≥ 30000 yuan/year = ≥ 2500 yuan/month (band 1500–2500 households)  30000
            activity_space             not met  ≥ 360 m² (20 per 100 households, at least 200)                     300
            2 met, 2 not met, 0 unknown, 1 n/a
        "#]],
    );
    check(
        "wuhan",
        r#"{"households": 900}"#,
        expect![[r#"
            rule                       status   required                                                        actual  reason
            station_staff_cap_central  unknown  ≤ 5 people                                                      ?       district unknown (rule is for central districts)
            station_staff_cap_outer    unknown  ≤ 4 people                                                      ?       district unknown (rule is for outer/township districts)
            party_funds                unknown  -                                                               ?       party_members unknown
            work_funds_by_size         unknown  ≥ 24000 yuan/year = ≥ 2000 yuan/month (band 0–1499 households)  ?       work_funds_yuan_per_year unknown
            activity_space             unknown  ≥ 200 m² (20 per 100 households, at least 200)                  ?       activity_space_m2 unknown
            0 met, 0 not met, 5 unknown, 0 n/a
        "#]],
    );
    check(
        "hangzhou",
        r#"{"households": 1700, "population": 5000, "newly_built": true,
            "activity_space_m2": 510, "volunteers": 300}"#,
        expect![[r#"
            rule                status   required                                actual  reason
            new_community_size  met      1500–2000 households                    1700
            activity_space      met      ≥ 510 m² (30 per 100 households)        510
            volunteers          not met  ≥ 400 volunteers (8 per 100 residents)  300
            2 met, 1 not met, 0 unknown, 0 n/a
        "#]],
    );
    check(
        "loudi",
        r#"{"households": 1150, "population": 3300, "grids": 6, "staff": 6,
            "committee_members": 5, "activity_space_m2": 420, "service_hall_m2": 60,
            "district": "outer", "newly_built": false,
            "work_funds_yuan_per_year": 200000, "project_funds_yuan_per_year": 80000,
            "volunteers": 500}"#,
        expect![[r#"
            rule                         status   required                                                                actual  reason
            grid_size                    met      5–6 grids (200 households per grid) or 5–6 grids (600 people per grid)  6
            committee_members            met      5–7 people                                                              5
            staff_per_households         met      ≥ 6 people (1 per 200 households, at least 5, at most 7 required)       6
            public_service_space         met      ≥ 400 m²                                                                420
            public_service_space_new     n/a      -                                                                       420     rule is for new communities
            service_centre               met      ≥ 50 m²                                                                 60
            operating_funds_central      n/a      -                                                                       200000  rule is for central districts, community is outer
            project_funds_central        n/a      -                                                                       80000   rule is for central districts, community is outer
            operating_funds_county_town  met      ≥ 200000 yuan/year                                                      200000
            project_funds_county_town    not met  ≥ 100000 yuan/year                                                      80000
            operating_funds_township     n/a      -                                                                       200000  rule is for township districts, community is outer
            volunteers                   met      ≥ 495 volunteers (15 per 100 residents)                                 500
            7 met, 1 not met, 0 unknown, 4 n/a
        "#]],
    );
    check(
        "yixing",
        r#"{"households": 1350, "staff": 6}"#,
        expect![[r#"
            rule                  status   required                           actual  reason
            staff_per_households  not met  ≥ 7 people (1 per 200 households)  6
            0 met, 1 not met, 0 unknown, 0 n/a
        "#]],
    );
    check(
        "sanming",
        r#"{"households": 3200, "staff": 12, "work_funds_yuan_per_year": 120000,
            "activity_space_m2": 650}"#,
        expect![[r#"
            rule           status   required                              actual  reason
            staff_by_size  not met  7–11 people (band ≥ 3001 households)  12
            work_funds     met      ≥ 100000 yuan/year                    120000
            service_space  met      ≥ 600 m²                              650
            2 met, 1 not met, 0 unknown, 0 n/a
        "#]],
    );
}

#[test]
fn report_round_trips_through_json() {
    let profile = builtin("loudi").expect("embedded profile");
    let facts = CommunityFacts {
        grids: Some(3),
        ..CommunityFacts::with_households(640)
    };
    let report = evaluate(&profile, &facts);
    let json = serde_json::to_string(&report).expect("serialise");
    let back: standards::ComplianceReport = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back, report);
    let grid = &report.findings[0];
    expect![[r#"
        {
          "rule_id": "grid_size",
          "title": "Grids of about 200 households or 600 people",
          "measure": "grids",
          "unit": "grids",
          "required": {
            "any_of": [
              {
                "min": 3.0,
                "max": 4.0
              }
            ],
            "text": "3–4 grids (200 households per grid; or 600 people per grid, population unknown)"
          },
          "actual": 3.0,
          "status": "met",
          "reason": "",
          "citation": {
            "file": "002_5ec5a89cad8c6552.txt",
            "title": "关于进一步加强社区党建和社区建设的实施意见(娄发〔2015〕12号)",
            "city": "娄底 Loudi",
            "year": 2015,
            "clause": "按200户或600人左右的规模将社区划分为若干个网格单元,形成网格化管理机制",
            "note": "左右 (about): met when the grid count is the floor or ceiling of households/200 or of population/600."
          }
        }"#]]
    .assert_eq(&serde_json::to_string_pretty(grid).expect("serialise"));
}
