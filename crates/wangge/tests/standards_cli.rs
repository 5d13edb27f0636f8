//! `wangge standards` end to end: the built binary reads communities (GeoJSON or JSON), checks
//! them against the seed cities' profiles and prints tables or JSON; bad input is named.

use std::path::PathBuf;
use std::process::Command;

use expect_test::{Expect, expect};

/// A file under the system temp dir, removed when dropped.
struct TempInput(PathBuf);

impl TempInput {
    fn new(name: &str, contents: &str) -> TempInput {
        let path = std::env::temp_dir().join(format!(
            "wangge-standards-cli-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, contents).expect("write temp input");
        TempInput(path)
    }
}

impl Drop for TempInput {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Output {
    success: bool,
    stdout: String,
    /// The `error: ...` lines only (logs go to stderr too).
    errors: String,
}

fn wangge(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args(args)
        .env("RUST_LOG", "off")
        .env_remove("WANGGE_CONFIG")
        .output()
        .expect("run wangge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    Output {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        errors: stderr
            .lines()
            .filter(|line| line.starts_with("error:") || line.starts_with("note:"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// Runs `wangge standards` on `input` (written to a temp file named `name`) with `extra`
/// arguments; snapshots stdout on success, the error lines on failure.
fn check(name: &str, input: &str, extra: &[&str], expect: Expect) {
    let file = TempInput::new(name, input);
    let path = file.0.to_str().expect("utf-8 temp path");
    let mut args = vec!["standards", "--input", path];
    args.extend_from_slice(extra);
    let output = wangge(&args);
    if output.success {
        expect.assert_eq(&output.stdout);
    } else {
        expect.assert_eq(&output.errors.replace(path, "<input>"));
    }
}

/// Two communities of a small town, as `wangge partition` reads them: one carries its facts,
/// the other only has buildings with households.
const TOWN: &str = r#"{
  "type": "FeatureCollection",
  "features": [
    {"type": "Feature", "geometry": null,
     "properties": {"kind": "community", "id": "431302001001", "name": "东风社区",
                    "households": 1150, "population": 3300, "grids": 6, "staff": 6,
                    "committee_members": 5, "activity_space_m2": 420, "service_hall_m2": 60,
                    "district": "central", "newly_built": false,
                    "work_funds_yuan_per_year": 250000, "project_funds_yuan_per_year": 150000,
                    "volunteers": 400}},
    {"type": "Feature", "geometry": null,
     "properties": {"kind": "community", "id": "431302001002", "grids": 2}},
    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [112.0, 27.7]},
     "properties": {"kind": "building", "community": "431302001002", "households": 240}},
    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [112.001, 27.7]},
     "properties": {"kind": "building", "community": "431302001002", "households": 260}},
    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [112.002, 27.7]},
     "properties": {"kind": "building", "households": 30}}
  ]
}"#;

#[test]
fn loudi_tables_from_geojson() {
    check(
        "town.geojson",
        TOWN,
        &["--city", "loudi"],
        expect![[r#"
            == community 431302001001 · 娄底 Loudi · 1150 households ==
            rule                         status   required                                                                actual  reason
            grid_size                    met      5–6 grids (200 households per grid) or 5–6 grids (600 people per grid)  6
            committee_members            met      5–7 people                                                              5
            staff_per_households         met      ≥ 6 people (1 per 200 households, at least 5, at most 7 required)       6
            public_service_space         met      ≥ 400 m²                                                                420
            public_service_space_new     n/a      -                                                                       420     rule is for new communities
            service_centre               met      ≥ 50 m²                                                                 60
            operating_funds_central      met      ≥ 250000 yuan/year                                                      250000
            project_funds_central        not met  ≥ 200000 yuan/year                                                      150000
            operating_funds_county_town  n/a      -                                                                       250000  rule is for outer districts, community is central
            project_funds_county_town    n/a      -                                                                       150000  rule is for outer districts, community is central
            operating_funds_township     n/a      -                                                                       250000  rule is for township districts, community is central
            volunteers                   not met  ≥ 495 volunteers (15 per 100 residents)                                 400
            6 met, 2 not met, 0 unknown, 4 n/a

            == community 431302001002 · 娄底 Loudi · 500 households ==
            rule                         status   required                                                                         actual  reason
            grid_size                    met      2–3 grids (200 households per grid; or 600 people per grid, population unknown)  2
            committee_members            unknown  5–7 people                                                                       ?       committee_members unknown
            staff_per_households         unknown  ≥ 5 people (1 per 200 households, at least 5, at most 7 required)                ?       staff unknown
            public_service_space         unknown  ≥ 400 m²                                                                         ?       activity_space_m2 unknown
            public_service_space_new     unknown  ≥ 600 m²                                                                         ?       newly_built unknown (rule is for new communities)
            service_centre               unknown  ≥ 50 m²                                                                          ?       service_hall_m2 unknown
            operating_funds_central      unknown  ≥ 250000 yuan/year                                                               ?       district unknown (rule is for central districts)
            project_funds_central        unknown  ≥ 200000 yuan/year                                                               ?       district unknown (rule is for central districts)
            operating_funds_county_town  unknown  ≥ 200000 yuan/year                                                               ?       district unknown (rule is for outer districts)
            project_funds_county_town    unknown  ≥ 100000 yuan/year                                                               ?       district unknown (rule is for outer districts)
            operating_funds_township     unknown  ≥ 150000 yuan/year                                                               ?       district unknown (rule is for township districts)
            volunteers                   unknown  -                                                                                ?       population unknown
            1 met, 0 not met, 11 unknown, 0 n/a

            Sources: 002_5ec5a89cad8c6552.txt 《关于进一步加强社区党建和社区建设的实施意见(娄发〔2015〕12号)》 (娄底 Loudi, 2015)
              [grid_size] “按200户或600人左右的规模将社区划分为若干个网格单元,形成网格化管理机制”
                  note: 左右 (about): met when the grid count is the floor or ceiling of households/200 or of population/600.
              [committee_members] “社区“两委”一般各配备3-5人,“两委”班子成员总数控制在5-7人”
                  note: The 3–5 per committee is not checked (the facts hold only the total).
              [staff_per_households] “社区工作人员总数(含“两委”班子成员)按“每200户常住人口配1名工作人员”的标准配置57名工作人员”
                  note: The seed text reads 配置57名 (the dash of 5–7 is lost); read as 5–7. Communities with more residents may hire more, so there is no upper limit on actual staff.
              [public_service_space] “2015年底,全市各社区公共服务用房面积按照不低于400平方米的标准建成达标。”
              [public_service_space_new] “新建城市社区公共服务用房面积不低于600平方米。”
              [service_centre] “按照“一居一中心”模式设立“社区服务中心”,面积不少于50平方米”
              [operating_funds_central] “从2016年起,娄底市中心城区社区运转经费和社区惠民项目资金要分别按不低于25万元、20万元的标准,其它县(市)城区社区运转经费和社区惠民项目资金要分别按不低于20万元、10万元的标准,乡镇社区运转经费要按不低于15万元的标准落实到位。”
                  note: The text gives no period; read as per year (an annual budget standard raised 'after 2016').
              [project_funds_central] “从2016年起,娄底市中心城区社区运转经费和社区惠民项目资金要分别按不低于25万元、20万元的标准,其它县(市)城区社区运转经费和社区惠民项目资金要分别按不低于20万元、10万元的标准,乡镇社区运转经费要按不低于15万元的标准落实到位。”
                  note: The text gives no period; read as per year.
              [operating_funds_county_town] “从2016年起,娄底市中心城区社区运转经费和社区惠民项目资金要分别按不低于25万元、20万元的标准,其它县(市)城区社区运转经费和社区惠民项目资金要分别按不低于20万元、10万元的标准,乡镇社区运转经费要按不低于15万元的标准落实到位。”
                  note: The text gives no period; read as per year. 其它县(市)城区 is the `outer` district kind.
              [project_funds_county_town] “从2016年起,娄底市中心城区社区运转经费和社区惠民项目资金要分别按不低于25万元、20万元的标准,其它县(市)城区社区运转经费和社区惠民项目资金要分别按不低于20万元、10万元的标准,乡镇社区运转经费要按不低于15万元的标准落实到位。”
                  note: The text gives no period; read as per year.
              [operating_funds_township] “从2016年起,娄底市中心城区社区运转经费和社区惠民项目资金要分别按不低于25万元、20万元的标准,其它县(市)城区社区运转经费和社区惠民项目资金要分别按不低于20万元、10万元的标准,乡镇社区运转经费要按不低于15万元的标准落实到位。”
                  note: The text gives no period; read as per year. No project-funds figure is given for townships.
              [volunteers] “2018年,志愿者人数逐步达到社区居民总数的15%以上。”
        "#]],
    );
}

#[test]
fn all_cities_compared() {
    check(
        "town-all.geojson",
        TOWN,
        &["--city", "all"],
        expect![[r#"
            == community 431302001001 · 1150 households ==
            city           met  not met  unknown  n/a  rules not met
            武汉 Wuhan       2        0        2    1
            杭州 Hangzhou    2        0        0    1
            娄底 Loudi       6        2        0    4  project_funds_central, volunteers
            宜兴 Yixing      1        0        0    0
            三明 Sanming     1        2        0    0  staff_by_size, service_space

            == community 431302001002 · 500 households ==
            city           met  not met  unknown  n/a  rules not met
            武汉 Wuhan       0        0        5    0
            杭州 Hangzhou    0        0        3    0
            娄底 Loudi       1        0       11    0
            宜兴 Yixing      0        0        1    0
            三明 Sanming     0        0        3    0

            Per-rule detail and sources: wangge standards --city <city> --input <file>
        "#]],
    );
}

#[test]
fn json_output_carries_statuses_and_citations() {
    let file = TempInput::new(
        "array.json",
        r#"[{"id": "c1", "households": 1499, "work_funds_yuan_per_year": 24000},
            {"id": 2, "households": 1500, "work_funds_yuan_per_year": 24000}]"#,
    );
    let output = wangge(&[
        "standards",
        "--city",
        "wuhan",
        "--input",
        file.0.to_str().expect("utf-8 temp path"),
        "--json",
    ]);
    assert!(output.success, "{}", output.errors);
    let json: serde_json::Value = serde_json::from_str(&output.stdout).expect("JSON output");
    let lines: Vec<String> = json["communities"]
        .as_array()
        .expect("communities array")
        .iter()
        .map(|community| {
            let report = &community["reports"][0];
            let funds = report["findings"]
                .as_array()
                .expect("findings")
                .iter()
                .find(|finding| finding["rule_id"] == "work_funds_by_size")
                .expect("work funds finding");
            format!(
                "{} {} households: {} {} (required {}) — {}",
                community["id"],
                report["households"],
                funds["status"],
                funds["actual"],
                funds["required"]["any_of"][0]["min"],
                funds["citation"]["file"],
            )
        })
        .collect();
    expect![[r#"
        "c1" 1499 households: "met" 24000.0 (required 24000.0) — "000_3ac0977ad321e118.txt"
        "2" 1500 households: "not_met" 24000.0 (required 30000.0) — "000_3ac0977ad321e118.txt""#]]
    .assert_eq(&lines.join("\n"));
}

#[test]
fn bad_input_is_named() {
    check(
        "bad-fact.json",
        r#"[{"id": "c1", "households": 900}, {"id": "c2", "households": "many"}]"#,
        &["--city", "yixing"],
        expect![[
            r#"error: in <input>: community "c2": bad fact: invalid type: string "many", expected u32"#
        ]],
    );
    check(
        "no-households.geojson",
        r#"{"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": null, "properties": {"kind": "community", "id": "lonely"}}]}"#,
        &["--city", "sanming"],
        expect![[
            r#"error: in <input>: community "lonely" has no households, and no building names it in its `community` property"#
        ]],
    );
    check(
        "a-building-without-households.geojson",
        r#"{"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": null, "properties": {"kind": "community", "id": "c", "activity_space_m2": 100}},
            {"type": "Feature", "geometry": null, "properties": {"kind": "building", "community": "c", "households": 300}},
            {"type": "Feature", "geometry": null, "properties": {"kind": "building", "community": "c"}}]}"#,
        &["--city", "hangzhou"],
        expect![[
            r#"error: in <input>: community "c" has no households, and 1 of its buildings do not say theirs: a sum of the others would judge every household rule on too few; give the community's `households`, or every building's"#
        ]],
    );
    check(
        "duplicate.json",
        r#"[{"id": "c1", "households": 900}, {"id": "c1", "households": 800}]"#,
        &["--city", "hangzhou"],
        expect![[r#"error: in <input>: community "c1" appears twice"#]],
    );
    check(
        "negative-space.json",
        r#"[{"id": "c1", "households": 900, "activity_space_m2": -5}]"#,
        &["--city", "wuhan"],
        expect![[
            r#"error: in <input>: community "c1": bad fact: activity_space_m2 = -5 must be a finite number >= 0"#
        ]],
    );
    check(
        "not-json.geojson",
        "households: 900",
        &["--city", "wuhan"],
        expect!["error: <input> is not valid JSON: expected value at line 1 column 1"],
    );
    check(
        "town-unknown-city.geojson",
        TOWN,
        &["--city", "beijing"],
        expect![[
            r#"error: unknown city "beijing": built-in profiles are wuhan, hangzhou, loudi, yixing, sanming"#
        ]],
    );
}
