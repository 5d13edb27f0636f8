//! Profiles load, cite their documents verbatim, and malformed profiles are refused with a
//! typed error that names the city and rule.

use expect_test::{Expect, expect};
use standards::{CITIES, Profile, ProfileError, builtin, builtin_all};

fn seed_text(file: &str) -> String {
    let path = format!("{}/tests/seeds/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

#[test]
fn every_builtin_profile_loads_and_names_its_city() {
    let profiles = builtin_all().expect("embedded profiles are valid");
    let listing: Vec<String> = profiles
        .iter()
        .map(|profile| {
            let rules: Vec<&str> = profile.rules.iter().map(|rule| rule.id.as_str()).collect();
            format!("{} ({}): {}", profile.city, profile.name, rules.join(", "))
        })
        .collect();
    assert_eq!(
        profiles.iter().map(|p| p.city.as_str()).collect::<Vec<_>>(),
        CITIES
    );
    expect![[r#"
        wuhan (武汉 Wuhan): station_staff_cap_central, station_staff_cap_outer, party_funds, work_funds_by_size, activity_space
        hangzhou (杭州 Hangzhou): new_community_size, activity_space, volunteers
        loudi (娄底 Loudi): grid_size, committee_members, staff_per_households, public_service_space, public_service_space_new, service_centre, operating_funds_central, project_funds_central, operating_funds_county_town, project_funds_county_town, operating_funds_township, volunteers
        yixing (宜兴 Yixing): staff_per_households
        sanming (三明 Sanming): staff_by_size, work_funds, service_space"#]]
    .assert_eq(&listing.join("\n"));
}

#[test]
fn every_clause_is_quoted_verbatim_from_its_document() {
    for profile in builtin_all().expect("embedded profiles are valid") {
        for document in &profile.documents {
            assert!(
                !seed_text(&document.file).is_empty(),
                "{}: {}",
                profile.city,
                document.file
            );
        }
        for rule in &profile.rules {
            let text = seed_text(&rule.source);
            assert!(
                text.contains(&rule.clause),
                "{} rule {}: clause not found verbatim in {}:\n{}",
                profile.city,
                rule.id,
                rule.source,
                rule.clause
            );
        }
    }
}

#[test]
fn every_rule_figure_appears_in_its_clause() {
    // Each number a rule requires (in the document's unit) must be written in its clause, so a
    // figure cannot drift from the sentence it cites.
    use standards::Requirement;
    for profile in builtin_all().expect("embedded profiles are valid") {
        for rule in &profile.rules {
            let mut figures: Vec<f64> = Vec::new();
            match &rule.require {
                Requirement::Range { min, max } => figures.extend(min.iter().chain(max)),
                Requirement::PerUnit {
                    per,
                    amount,
                    floor,
                    cap,
                    ..
                } => {
                    figures.extend([*amount]);
                    figures.extend(floor.iter().chain(cap));
                    if *per != 1.0 && *per != 100.0 {
                        figures.push(*per);
                    }
                }
                Requirement::Bands { bands, .. } => {
                    for band in bands {
                        figures.extend(band.min.iter().chain(&band.max));
                    }
                }
                Requirement::GridSize {
                    households_per_grid,
                    population_per_grid,
                } => {
                    figures.push(f64::from(*households_per_grid));
                    figures.extend(population_per_grid.map(f64::from));
                }
            }
            for figure in figures {
                // 250000 yuan is written 25万元 in the documents.
                let written = if figure >= 10_000.0 && figure % 10_000.0 == 0.0 {
                    format!("{}万", figure / 10_000.0)
                } else {
                    format!("{figure}")
                };
                assert!(
                    rule.clause.contains(&written),
                    "{} rule {}: figure {written} is not in its clause",
                    profile.city,
                    rule.id
                );
            }
        }
    }
}

fn check_refused(toml: &str, expect: Expect) {
    let error: ProfileError =
        Profile::from_toml_str(toml, "test.toml").expect_err("profile must be refused");
    expect.assert_eq(&error.to_string());
}

const HEADER: &str = r#"
city = "test"
name = "Test"
[[documents]]
file = "doc.txt"
title = "Doc"
city = "Test"
year = 2020
"#;

fn with_rule(rule: &str) -> String {
    format!("{HEADER}\n[[rules]]\n{rule}")
}

#[test]
fn malformed_profiles_are_refused_with_a_named_error() {
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "other.txt"
clause = "c"
require = { kind = "range", min = 1 }"#,
        ),
        expect![[r#"profile test: rule a cites "other.txt", which is not among its documents"#]],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = "c"
require = { kind = "range", min = 9, max = 3 }"#,
        ),
        expect!["profile test: rule a: min (9) is above max (3)"],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = "c"
require = { kind = "range" }"#,
        ),
        expect!["profile test: rule a: requires nothing (no minimum and no maximum)"],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = "c"
require = { kind = "bands", basis = "households", bands = [{ from = 0, to = 99, min = 1 }, { from = 101, min = 2 }] }"#,
        ),
        expect![
            "profile test: rule a: bands must start at 0, follow each other without gap or overlap and end open: band 1 starts at 101 instead of 100"
        ],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
period = "month"
source = "doc.txt"
clause = "c"
require = { kind = "range", min = 1 }"#,
        ),
        expect!["profile test: rule a: `period = month` is only for money measures, not staff"],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = "c"
require = { kind = "per_unit", basis = "households", per = 0, amount = 1 }"#,
        ),
        expect!["profile test: rule a: per = 0 must be a finite number > 0"],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = ""
require = { kind = "range", min = 1 }"#,
        ),
        expect![[r#"profile test: clause of "a" is empty"#]],
    );
    check_refused(
        &format!(
            "{}\n[[rules]]\n{}",
            with_rule(
                r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = "c"
require = { kind = "range", min = 1 }"#
            ),
            r#"id = "a"
title = "t"
measure = "grids"
source = "doc.txt"
clause = "c"
require = { kind = "range", min = 1 }"#
        ),
        expect![[r#"profile test: rule id "a" appears twice"#]],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = "c"
colour = "red"
require = { kind = "range", min = 1 }"#,
        ),
        expect![[r#"
            test.toml: not a valid profile: TOML parse error at line 16, column 1
               |
            16 | colour = "red"
               | ^^^^^^
            unknown field `colour`, expected one of `id`, `title`, `measure`, `period`, `source`, `clause`, `note`, `applies`, `require`
        "#]],
    );
    check_refused(
        &with_rule(
            r#"id = "a"
title = "t"
measure = "staff"
source = "doc.txt"
clause = "c"
require = { kind = "grid_size", households_per_grid = 200 }"#,
        ),
        expect!["profile test: rule a: a grid_size requirement must constrain `grids`, not staff"],
    );
}

#[test]
fn unknown_city_is_refused() {
    let error = builtin("beijing").expect_err("no beijing profile");
    expect![[
        r#"unknown city "beijing": built-in profiles are wuhan, hangzhou, loudi, yixing, sanming"#
    ]]
    .assert_eq(&error.to_string());
}
