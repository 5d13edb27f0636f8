//! `wangge standards`: check communities against a city's policy standards, offline.
//!
//! Input is the GeoJSON `wangge partition` reads (features with `properties.kind` =
//! `"community"` or `"building"`) or a plain JSON array of community objects. A community's
//! facts are its properties (see `standards::CommunityFacts`); when it has no `households`, the
//! `households` of the buildings whose `community` property names it are summed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Map, Value};
use standards::{CITIES, CommunityFacts, ComplianceReport, Profile};

/// Largest input file read (a whole city's buildings as GeoJSON fits well within it).
const INPUT_MAX_BYTES: u64 = 1 << 30;
/// Most features or array items read from one input.
const FEATURES_MAX: usize = 10_000_000;
/// Most communities one run reports on.
const COMMUNITIES_MAX: usize = 100_000;

#[derive(Debug, clap::Args)]
pub struct StandardsArgs {
    /// City profile: wuhan, hangzhou, loudi, yixing, sanming, or `all` to compare the five.
    #[arg(long, required_unless_present = "profile")]
    city: Option<String>,
    /// A profile TOML file (same format as config/standards/*.toml) instead of a built-in city.
    #[arg(long, conflicts_with = "city")]
    profile: Option<PathBuf>,
    /// Communities: a GeoJSON FeatureCollection or a JSON array of community objects.
    #[arg(long)]
    input: PathBuf,
    /// Print the reports as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// One community read from the input: its id and what is known of it.
#[derive(Debug, serde::Serialize)]
struct Community {
    id: String,
    facts: CommunityFacts,
}

#[derive(Debug, serde::Serialize)]
struct CommunityReports<'a> {
    id: &'a str,
    facts: &'a CommunityFacts,
    reports: Vec<ComplianceReport>,
}

pub fn run(args: StandardsArgs) -> anyhow::Result<()> {
    let profiles = profiles(&args)?;
    let communities = read_communities(&args.input)?;
    let results: Vec<CommunityReports> = communities
        .iter()
        .map(|community| CommunityReports {
            id: &community.id,
            facts: &community.facts,
            reports: profiles
                .iter()
                .map(|profile| standards::evaluate(profile, &community.facts))
                .collect(),
        })
        .collect();
    if args.json {
        let out = serde_json::json!({ "communities": results });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if profiles.len() == 1 {
        print_tables(&profiles[0], &results);
    } else {
        print_comparison(&profiles, &results);
    }
    Ok(())
}

fn profiles(args: &StandardsArgs) -> anyhow::Result<Vec<Profile>> {
    if let Some(path) = &args.profile {
        let text = read_bounded(path)?;
        return Ok(vec![Profile::from_toml_str(
            &text,
            &path.display().to_string(),
        )?]);
    }
    match args.city.as_deref() {
        Some("all") => Ok(standards::builtin_all()?),
        Some(city) => Ok(vec![standards::builtin(city)?]),
        None => bail!("give --city ({} or all) or --profile", CITIES.join(", ")),
    }
}

fn read_bounded(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if bytes > INPUT_MAX_BYTES {
        bail!(
            "{} is {bytes} bytes, more than the {INPUT_MAX_BYTES} read",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_communities(path: &Path) -> anyhow::Result<Vec<Community>> {
    let text = read_bounded(path)?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let communities = match &value {
        Value::Object(object) if object.get("type") == Some(&Value::from("FeatureCollection")) => {
            let features = object
                .get("features")
                .and_then(Value::as_array)
                .with_context(|| {
                    format!(
                        "{}: FeatureCollection without a features array",
                        path.display()
                    )
                })?;
            from_features(features)
        }
        Value::Array(items) => from_array(items),
        _ => bail!(
            "{}: expected a GeoJSON FeatureCollection or a JSON array of communities",
            path.display()
        ),
    }
    .with_context(|| format!("in {}", path.display()))?;
    if communities.is_empty() {
        bail!(
            "{}: no communities found (features need properties.kind = \"community\")",
            path.display()
        );
    }
    Ok(communities)
}

fn id_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(id) if !id.trim().is_empty() => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

fn from_array(items: &[Value]) -> anyhow::Result<Vec<Community>> {
    check_count(items.len())?;
    let mut communities = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let properties = item
            .as_object()
            .with_context(|| format!("item #{index} is not an object"))?;
        let id = id_of(properties.get("id"))
            .with_context(|| format!("item #{index} has no id (a string or a number)"))?;
        communities.push((id, properties.clone()));
    }
    finish(communities, &BTreeMap::new(), &BTreeMap::new())
}

fn from_features(features: &[Value]) -> anyhow::Result<Vec<Community>> {
    check_count(features.len())?;
    let mut communities = Vec::new();
    let mut building_households: BTreeMap<String, u64> = BTreeMap::new();
    // Community -> its buildings that do not say their households: a community's count
    // summed from its buildings is unknown while any is.
    let mut households_unknown: BTreeMap<String, usize> = BTreeMap::new();
    let mut buildings_without_community = 0_usize;
    for (index, feature) in features.iter().enumerate() {
        let properties = match feature.get("properties") {
            Some(Value::Object(properties)) => properties,
            Some(Value::Null) | None => continue,
            Some(_) => bail!("feature #{index}: properties is not an object"),
        };
        match properties.get("kind").and_then(Value::as_str) {
            Some("community") => {
                let id = id_of(properties.get("id"))
                    .or_else(|| id_of(feature.get("id")))
                    .with_context(|| format!("feature #{index} (community) has no id"))?;
                communities.push((id, properties.clone()));
            }
            Some("building") => {
                let households = match properties.get("households") {
                    None | Some(Value::Null) => {
                        if let Some(community) = id_of(properties.get("community")) {
                            *households_unknown.entry(community).or_default() += 1;
                        }
                        continue;
                    }
                    Some(value) => value.as_u64().with_context(|| {
                        format!("feature #{index} (building): households = {value} is not a whole number >= 0")
                    })?,
                };
                match id_of(properties.get("community")) {
                    Some(community) => {
                        *building_households.entry(community).or_default() += households
                    }
                    None => buildings_without_community += 1,
                }
            }
            _ => {}
        }
    }
    if buildings_without_community > 0 {
        eprintln!(
            "note: {buildings_without_community} building(s) with households but no `community` property were not counted"
        );
    }
    finish(communities, &building_households, &households_unknown)
}

fn check_count(count: usize) -> anyhow::Result<()> {
    if count > FEATURES_MAX {
        bail!("{count} items, more than the {FEATURES_MAX} read");
    }
    Ok(())
}

fn finish(
    raw: Vec<(String, Map<String, Value>)>,
    building_households: &BTreeMap<String, u64>,
    households_unknown: &BTreeMap<String, usize>,
) -> anyhow::Result<Vec<Community>> {
    if raw.len() > COMMUNITIES_MAX {
        bail!(
            "{} communities, more than the {COMMUNITIES_MAX} checked in one run",
            raw.len()
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut communities = Vec::with_capacity(raw.len());
    for (id, mut properties) in raw {
        if !seen.insert(id.clone()) {
            bail!("community {id:?} appears twice");
        }
        if matches!(properties.get("households"), None | Some(Value::Null)) {
            if let Some(unknown) = households_unknown.get(&id) {
                bail!(
                    "community {id:?} has no households, and {unknown} of its buildings do not say \
                     theirs: a sum of the others would judge every household rule on too few; give \
                     the community's `households`, or every building's"
                );
            }
            let Some(&households) = building_households.get(&id) else {
                bail!(
                    "community {id:?} has no households, and no building names it in its `community` property"
                );
            };
            properties.insert("households".to_owned(), Value::from(households));
        }
        let facts: CommunityFacts = serde_json::from_value(Value::Object(properties))
            .with_context(|| format!("community {id:?}: bad fact"))?;
        facts
            .validate()
            .with_context(|| format!("community {id:?}: bad fact"))?;
        communities.push(Community { id, facts });
    }
    let unknown: Vec<&String> = building_households
        .keys()
        .filter(|community| !seen.contains(*community))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "note: buildings name {} community id(s) not in the input, e.g. {:?}",
            unknown.len(),
            unknown[0]
        );
    }
    Ok(communities)
}

fn print_tables(profile: &Profile, results: &[CommunityReports]) {
    for result in results {
        for report in &result.reports {
            println!(
                "== community {} · {} · {} households ==",
                result.id, report.city_name, report.households
            );
            print!("{}", report.table());
            println!();
        }
    }
    print_citations(profile);
}

fn print_citations(profile: &Profile) {
    for document in &profile.documents {
        println!(
            "Sources: {} 《{}》 ({}, {})",
            document.file, document.title, document.city, document.year
        );
        for rule in profile
            .rules
            .iter()
            .filter(|rule| rule.source == document.file)
        {
            println!("  [{}] “{}”", rule.id, rule.clause);
            if let Some(note) = &rule.note {
                println!("      note: {note}");
            }
        }
    }
}

/// Terminal columns a string takes: CJK and full-width characters take two.
fn display_width(text: &str) -> usize {
    text.chars()
        .map(|c| {
            if ('\u{2E80}'..='\u{FFEF}').contains(&c) {
                2
            } else {
                1
            }
        })
        .sum()
}

fn print_comparison(profiles: &[Profile], results: &[CommunityReports]) {
    let width = profiles
        .iter()
        .map(|profile| display_width(&profile.name))
        .max()
        .unwrap_or(0);
    for result in results {
        println!(
            "== community {} · {} households ==",
            result.id, result.facts.households
        );
        println!(
            "{:width$}  met  not met  unknown  n/a  rules not met",
            "city",
            width = width
        );
        for report in &result.reports {
            let not_met: Vec<&str> = report
                .findings
                .iter()
                .filter(|finding| finding.status == standards::Status::NotMet)
                .map(|finding| finding.rule_id.as_str())
                .collect();
            let name_pad = width - display_width(&report.city_name);
            let summary = report.summary;
            let line = format!(
                "{}{}  {:>3}  {:>7}  {:>7}  {:>3}  {}",
                report.city_name,
                " ".repeat(name_pad),
                summary.met,
                summary.not_met,
                summary.unknown,
                summary.not_applicable,
                not_met.join(", ")
            );
            println!("{}", line.trim_end());
        }
        println!();
    }
    println!("Per-rule detail and sources: wangge standards --city <city> --input <file>");
}
