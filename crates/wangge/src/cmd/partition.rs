//! `wangge partition`, `wangge import osm`, `wangge bench partition|locate`: the offline side of
//! the grid partition (no NATS). The partition itself lives in the pure `partition` crate; this
//! module reads and checks GeoJSON, runs communities in parallel, and writes grids, a report
//! and an SVG map.
//!
//! Bad input policy: a file that cannot be read, is empty, is not JSON/GeoJSON or is not a
//! FeatureCollection is rejected whole. Inside a good file, each bad feature is rejected on its
//! own (with its id and reason, on stderr and in the report) and the good ones are partitioned;
//! `--strict` rejects the whole batch instead when any feature is bad.
//!
//! Input is parsed from `serde_json::Value` rather than typed `geojson` structs so that one bad
//! geometry yields one rejected feature with its id instead of a failed file.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use geo::{BoundingRect, Centroid, Coord, Intersects, LineString, MultiPolygon, Point, Polygon};
use partition::{BuildingInput, CommunityInput, Partition, PartitionError, Quality, UnitInput};
use serde_json::{Value, json};

/// Largest input file read (bytes).
const INPUT_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024;
/// Households above this in one building are rejected as absurd.
const BUILDING_HOUSEHOLDS_MAX: u64 = 5_000;
/// Population above this in one building is rejected as absurd.
const BUILDING_POPULATION_MAX: u64 = 50_000;
/// Largest id length accepted.
const ID_BYTES_MAX: usize = 128;
/// Communities without a code an input may hold: they are numbered 000000 000001 onwards, in
/// the six digits a 12-digit community code leaves after a county.
const UNCODED_COMMUNITIES_MAX: u32 = 999_999;
/// Largest SVG canvas side (pixels).
const SVG_SIDE_PIXELS: f64 = 1600.0;

#[derive(Debug, clap::Args)]
pub struct PartitionArgs {
    /// Input GeoJSON FeatureCollection of communities and buildings.
    #[arg(long)]
    input: PathBuf,
    /// Output GeoJSON FeatureCollection of grids.
    #[arg(long)]
    out: PathBuf,
    /// Also draw an SVG map (buildings coloured by grid, grid outlines and codes).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Also write a JSON report (quality per community and total, flags, rejections).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Reject the whole batch (write nothing) when any feature is bad.
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImportCommand {
    /// Turn an OpenStreetMap extract (.osm.pbf) into wangge GeoJSON (see docs/PARTITION.md).
    Osm(ImportOsmArgs),
}

#[derive(Debug, clap::Args)]
pub struct ImportOsmArgs {
    /// The .osm.pbf extract.
    file: PathBuf,
    /// Output GeoJSON (stdout when absent).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the household-count rule.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

/// One bad input item.
#[derive(Debug, Clone)]
struct Rejection {
    id: String,
    kind: &'static str,
    reason: String,
}

#[derive(Debug, Default)]
struct Input {
    communities: Vec<CommunityInput>,
    rejected: Vec<Rejection>,
    /// The input's top-level `attribution` (e.g. the OpenStreetMap notice `wangge import osm`
    /// writes): carried into every output derived from it, as the ODbL asks.
    attribution: Option<String>,
}

pub fn run(args: PartitionArgs) -> anyhow::Result<()> {
    let input = read_input(&args.input)?;
    for rejection in &input.rejected {
        eprintln!(
            "rejected {} {}: {}",
            rejection.kind, rejection.id, rejection.reason
        );
    }
    if args.strict && !input.rejected.is_empty() {
        anyhow::bail!(
            "{} bad feature(s) in {} and --strict is set: nothing written",
            input.rejected.len(),
            args.input.display()
        );
    }
    let results = partition_all(&input.communities);
    let mut rejected = input.rejected.clone();
    let mut partitions = Vec::new();
    for (community, result) in input.communities.iter().zip(results) {
        match result {
            Ok(p) => partitions.push(p),
            Err(error) => {
                eprintln!("rejected community {}: {error}", community.id);
                rejected.push(Rejection {
                    id: community.id.clone(),
                    kind: "community",
                    reason: error.to_string(),
                });
            }
        }
    }
    let mut grids = grids_geojson(&partitions);
    let mut report = report_json(&input.communities, &partitions, &rejected);
    if let Some(attribution) = &input.attribution {
        grids["attribution"] = json!(attribution);
        report["attribution"] = json!(attribution);
    }
    write_file(&args.out, &grids.to_string())?;
    if let Some(path) = &args.report {
        write_file(path, &serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = &args.svg {
        write_file(
            path,
            &svg_map(
                &input.communities,
                &partitions,
                input.attribution.as_deref(),
            ),
        )?;
    }
    println!("{}", report["total"]);
    Ok(())
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Partition every community, in parallel over the machine's cores.
fn partition_all(communities: &[CommunityInput]) -> Vec<Result<Partition, PartitionError>> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(communities.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Partition, PartitionError>>>> =
        Mutex::new((0..communities.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(community) = communities.get(index) else {
                        break;
                    };
                    let result = partition::partition(community);
                    if let Ok(mut slots) = results.lock() {
                        slots[index] = Some(result);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|slot| {
            slot.unwrap_or_else(|| {
                Err(PartitionError::Triangulation {
                    community: String::new(),
                    reason: "worker stopped".into(),
                })
            })
        })
        .collect()
}

// ---------------------------------------------------------------- reading and checking input

fn read_input(path: &Path) -> anyhow::Result<Input> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if size > INPUT_BYTES_MAX {
        anyhow::bail!(
            "{}: {size} bytes, more than {INPUT_BYTES_MAX}",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_input(&text).with_context(|| format!("{}", path.display()))
}

fn parse_input(text: &str) -> anyhow::Result<Input> {
    if text.trim().is_empty() {
        anyhow::bail!("empty file: expected a GeoJSON FeatureCollection");
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|error| anyhow::anyhow!("not GeoJSON (invalid JSON: {error})"))?;
    if value.get("type").and_then(Value::as_str) != Some("FeatureCollection") {
        anyhow::bail!("not a GeoJSON FeatureCollection (no \"type\": \"FeatureCollection\")");
    }
    let features = value
        .get("features")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow::anyhow!("FeatureCollection without a \"features\" array"))?;

    let mut input = Input {
        attribution: value
            .get("attribution")
            .and_then(Value::as_str)
            .map(str::to_owned),
        ..Input::default()
    };
    let mut seen_ids: HashSet<String> = HashSet::new();
    let mut communities: Vec<(CommunityInput, bool)> = Vec::new();
    let mut buildings: Vec<(BuildingInput, Option<String>)> = Vec::new();
    for (index, feature) in features.iter().enumerate() {
        let properties = feature.get("properties").and_then(Value::as_object);
        let kind = properties
            .and_then(|p| p.get("kind"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let id = properties.and_then(|p| p.get("id")).and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        let kind_name: &'static str = match kind {
            "community" => "community",
            "building" => "building",
            _ => "feature",
        };
        let mut reject = |id: String, reason: String| {
            input.rejected.push(Rejection {
                id,
                kind: kind_name,
                reason,
            })
        };
        let Some(id) = id.filter(|id| !id.is_empty() && id.len() <= ID_BYTES_MAX) else {
            reject(
                format!("#{index}"),
                format!(
                    "missing or bad \"id\" (a non-empty string of at most {ID_BYTES_MAX} bytes)"
                ),
            );
            continue;
        };
        if kind_name == "feature" {
            reject(
                id,
                format!("properties.kind is {kind:?}, expected \"community\" or \"building\""),
            );
            continue;
        }
        if !seen_ids.insert(format!("{kind_name}/{id}")) {
            reject(id, format!("duplicate {kind_name} id"));
            continue;
        }
        let properties = properties.cloned().unwrap_or_default();
        let geometry = feature.get("geometry").unwrap_or(&Value::Null);
        let result = if kind_name == "community" {
            parse_community(&id, &properties, geometry)
                .map(|(c, coded)| communities.push((c, coded)))
        } else {
            parse_building(&id, &properties, geometry).map(|b| buildings.push(b))
        };
        if let Err(reason) = result {
            reject(id, reason);
        }
    }

    // Communities without a code get 000000 + a six-digit sequence in input order (street
    // and community digits together), past any code given; a code used twice refuses the
    // later community: two communities under one code would give their grids the same codes.
    let mut used_codes: HashSet<String> = HashSet::new();
    let mut uncoded = 0u32;
    let mut kept = Vec::with_capacity(communities.len());
    for (mut community, coded) in communities {
        if !coded {
            uncoded += 1;
            if uncoded > UNCODED_COMMUNITIES_MAX {
                input.rejected.push(Rejection {
                    id: community.id.clone(),
                    kind: "community",
                    reason: format!(
                        "more than {UNCODED_COMMUNITIES_MAX} communities without a \"code\": give each its 12-digit code"
                    ),
                });
                continue;
            }
            community.code = format!("000000{uncoded:06}");
        }
        if !used_codes.insert(community.code.clone()) {
            input.rejected.push(Rejection {
                id: community.id.clone(),
                kind: "community",
                reason: format!(
                    "community code {} is used by another community",
                    community.code
                ),
            });
            continue;
        }
        kept.push(community);
    }
    let mut communities: Vec<CommunityInput> = kept;
    let by_id: HashMap<String, usize> = communities
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    let boxes: Vec<Option<geo::Rect<f64>>> = communities
        .iter()
        .map(|c| c.boundary.bounding_rect())
        .collect();
    for (building, community) in buildings {
        let target = match community {
            Some(community_id) => match by_id.get(&community_id) {
                Some(&i) if communities[i].boundary.intersects(&building.position) => Ok(i),
                Some(_) => Err(format!("outside its community {community_id}")),
                None => Err(format!("names unknown community {community_id:?}")),
            },
            None => communities
                .iter()
                .enumerate()
                .find(|(i, c)| {
                    boxes[*i].is_some_and(|b| b.intersects(&building.position))
                        && c.boundary.intersects(&building.position)
                })
                .map(|(i, _)| i)
                .ok_or_else(|| "outside every community".to_string()),
        };
        match target {
            Ok(i) => communities[i].buildings.push(building),
            Err(reason) => input.rejected.push(Rejection {
                id: building.id,
                kind: "building",
                reason,
            }),
        }
    }
    input.communities = communities;
    Ok(input)
}

fn parse_position(value: &Value) -> Result<Coord<f64>, String> {
    let array = value.as_array().ok_or("a position is not an array")?;
    if array.len() < 2 {
        return Err("a position has fewer than 2 numbers".into());
    }
    let x = array[0].as_f64().ok_or("a coordinate is not a number")?;
    let y = array[1].as_f64().ok_or("a coordinate is not a number")?;
    if !x.is_finite() || !y.is_finite() {
        return Err("a coordinate is not finite".into());
    }
    if !(-180.0..=180.0).contains(&x) || !(-90.0..=90.0).contains(&y) {
        return Err(format!(
            "coordinate ({x}, {y}) is out of range (lon -180..180, lat -90..90)"
        ));
    }
    Ok(Coord { x, y })
}

fn parse_ring(value: &Value) -> Result<LineString<f64>, String> {
    let array = value.as_array().ok_or("a ring is not an array")?;
    let coords = array
        .iter()
        .map(parse_position)
        .collect::<Result<Vec<_>, _>>()?;
    if coords.len() < 4 || coords.first() != coords.last() {
        return Err("a ring must be closed with at least 4 positions".into());
    }
    Ok(LineString::new(coords))
}

fn parse_polygon(value: &Value) -> Result<Polygon<f64>, String> {
    let rings = value
        .as_array()
        .ok_or("polygon coordinates are not an array")?;
    let mut rings = rings.iter().map(parse_ring);
    let exterior = rings.next().ok_or("polygon without rings")??;
    let interiors = rings.collect::<Result<Vec<_>, _>>()?;
    Ok(Polygon::new(exterior, interiors))
}

fn check_valid<G: geo::algorithm::Validation>(geometry: &G) -> Result<(), String> {
    geometry
        .check_validation()
        .map_err(|error| format!("invalid geometry: {error}"))
}

fn parse_community(
    id: &str,
    properties: &serde_json::Map<String, Value>,
    geometry: &Value,
) -> Result<(CommunityInput, bool), String> {
    let coordinates = geometry.get("coordinates").unwrap_or(&Value::Null);
    let boundary = match geometry.get("type").and_then(Value::as_str) {
        Some("Polygon") => MultiPolygon::new(vec![parse_polygon(coordinates)?]),
        Some("MultiPolygon") => MultiPolygon::new(
            coordinates
                .as_array()
                .ok_or("multipolygon coordinates are not an array")?
                .iter()
                .map(parse_polygon)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        other => {
            return Err(format!(
                "community geometry must be Polygon or MultiPolygon, not {other:?}"
            ));
        }
    };
    check_valid(&boundary)?;
    let code = match properties.get("code") {
        None | Some(Value::Null) => None,
        Some(Value::String(code))
            if code.len() == 12 && code.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Some(code.clone())
        }
        Some(other) => {
            return Err(format!(
                "code {other} is not 12 digits (district 6 + street 3 + community 3)"
            ));
        }
    };
    Ok((
        CommunityInput {
            id: id.to_string(),
            code: code.clone().unwrap_or_default(),
            boundary,
            buildings: Vec::new(),
        },
        code.is_some(),
    ))
}

fn parse_count(value: Option<&Value>, name: &str, max: u64) -> Result<Option<u32>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            if let Some(n) = value.as_u64() {
                if n > max {
                    return Err(format!("{name} {n} is absurd (more than {max})"));
                }
                return Ok(Some(n as u32));
            }
            if value.as_i64().is_some_and(|n| n < 0) || value.as_f64().is_some_and(|n| n < 0.0) {
                return Err(format!("{name} {value} is negative"));
            }
            Err(format!("{name} {value} is not a non-negative integer"))
        }
    }
}

fn parse_building(
    id: &str,
    properties: &serde_json::Map<String, Value>,
    geometry: &Value,
) -> Result<(BuildingInput, Option<String>), String> {
    let households = parse_count(
        properties.get("households"),
        "households",
        BUILDING_HOUSEHOLDS_MAX,
    )?
    .ok_or("missing households")?;
    let population = parse_count(
        properties.get("population"),
        "population",
        BUILDING_POPULATION_MAX,
    )?;
    let coordinates = geometry.get("coordinates").unwrap_or(&Value::Null);
    let (position, footprint) = match geometry.get("type").and_then(Value::as_str) {
        Some("Point") => (Point(parse_position(coordinates)?), None),
        Some("Polygon") => {
            let polygon = parse_polygon(coordinates)?;
            check_valid(&polygon)?;
            let centroid = polygon.centroid().ok_or("footprint has no area")?;
            (centroid, Some(polygon))
        }
        other => {
            return Err(format!(
                "building geometry must be Point or Polygon, not {other:?}"
            ));
        }
    };
    let mut units = Vec::new();
    if let Some(list) = properties.get("units").filter(|v| !v.is_null()) {
        let list = list.as_array().ok_or("units is not an array")?;
        if list.len() > partition::UNITS_PER_BUILDING_MAX {
            return Err(format!(
                "{} units, more than {}",
                list.len(),
                partition::UNITS_PER_BUILDING_MAX
            ));
        }
        let mut unit_ids = HashSet::new();
        for unit in list {
            let unit_id = match unit.get("id") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err("a unit has no id".into()),
            };
            if !unit_ids.insert(unit_id.clone()) {
                return Err(format!("duplicate unit id {unit_id}"));
            }
            let unit_households = parse_count(
                unit.get("households"),
                "unit households",
                BUILDING_HOUSEHOLDS_MAX,
            )?
            .ok_or_else(|| format!("unit {unit_id} has no households"))?;
            units.push(UnitInput {
                id: unit_id,
                households: unit_households,
            });
        }
        let sum: u32 = units.iter().map(|u| u.households).sum();
        if !units.is_empty() && sum != households {
            return Err(format!(
                "households {households} differ from the sum of its units {sum}"
            ));
        }
    }
    let community = match properties.get("community") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok((
        BuildingInput {
            id: id.to_string(),
            position,
            footprint,
            households,
            population,
            units,
        },
        community,
    ))
}

// ---------------------------------------------------------------- output

fn ring_json(ring: &LineString<f64>) -> Value {
    Value::Array(
        ring.coords()
            .map(|c| json!([round7(c.x), round7(c.y)]))
            .collect(),
    )
}

fn round7(v: f64) -> f64 {
    (v * 1e7).round() / 1e7
}

fn polygon_json(polygon: &Polygon<f64>) -> Value {
    json!({"type": "Polygon", "coordinates": polygon_rings(polygon)})
}

fn polygon_rings(polygon: &Polygon<f64>) -> Vec<Value> {
    let mut rings = vec![ring_json(polygon.exterior())];
    rings.extend(polygon.interiors().iter().map(ring_json));
    rings
}

/// A grid's land: its main polygon, and its detached parts (never dropped) as a MultiPolygon.
fn grid_geometry_json(grid: &partition::Grid) -> Value {
    if grid.detached.is_empty() {
        return polygon_json(&grid.polygon);
    }
    let parts: Vec<Value> = std::iter::once(&grid.polygon)
        .chain(&grid.detached)
        .map(|polygon| json!(polygon_rings(polygon)))
        .collect();
    json!({"type": "MultiPolygon", "coordinates": parts})
}

pub fn grids_geojson(partitions: &[Partition]) -> Value {
    let features: Vec<Value> = partitions
        .iter()
        .flat_map(|p| &p.grids)
        .map(|grid| {
            json!({
                "type": "Feature",
                "properties": {
                    "kind": "grid",
                    "grid_code": grid.grid_code,
                    "community": grid.community_id,
                    "households": grid.households,
                    "population": grid.population,
                    "buildings": grid.members,
                    "flags": grid.flags.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
                    "polsby_popper": (grid.polsby_popper * 1000.0).round() / 1000.0,
                },
                "geometry": grid_geometry_json(grid),
            })
        })
        .collect();
    json!({"type": "FeatureCollection", "features": features})
}

fn quality_json(quality: &Quality) -> Value {
    json!({
        "buildings": quality.buildings,
        "households": quality.households,
        "grids": quality.grids,
        "in_range": quality.in_range,
        "in_range_share": quality.in_range_share(),
        "disconnected": quality.disconnected,
        "flagged": quality.flagged,
        "pp_median": quality.polsby_popper_quantile(0.5),
        "pp_p10": quality.polsby_popper_quantile(0.1),
    })
}

fn report_json(
    communities: &[CommunityInput],
    partitions: &[Partition],
    rejected: &[Rejection],
) -> Value {
    let mut total = Quality::default();
    let codes: HashMap<&str, &str> = communities
        .iter()
        .map(|c| (c.id.as_str(), c.code.as_str()))
        .collect();
    let mut per_community = Vec::new();
    let mut flagged = Vec::new();
    for p in partitions {
        total.merge(&p.quality);
        let mut entry = quality_json(&p.quality);
        entry["community"] = json!(p.community_id);
        entry["code"] = json!(codes.get(p.community_id.as_str()));
        per_community.push(entry);
        for grid in p.grids.iter().filter(|g| !g.flags.is_empty()) {
            flagged.push(json!({
                "grid_code": grid.grid_code,
                "community": grid.community_id,
                "households": grid.households,
                "flags": grid.flags.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
                "detached_parts": grid.detached.len(),
            }));
        }
    }
    json!({
        "total": quality_json(&total),
        "targets": {"households_min": partition::HOUSEHOLDS_MIN, "households_max": partition::HOUSEHOLDS_MAX,
                    "households_target": partition::HOUSEHOLDS_TARGET, "pp_median_min": 0.45, "pp_p10_min": 0.30},
        "communities": per_community,
        "flagged": flagged,
        "rejected": rejected.iter().map(|r| json!({"kind": r.kind, "id": r.id, "reason": r.reason})).collect::<Vec<_>>(),
    })
}

/// A map a city engineer checks first: community boundaries, grids filled and outlined in
/// distinct colours with their codes, buildings as dots in their grid's colour.
pub fn svg_map(
    communities: &[CommunityInput],
    partitions: &[Partition],
    attribution: Option<&str>,
) -> String {
    let mut bounds: Option<geo::Rect<f64>> = None;
    for community in communities {
        if let Some(rect) = community.boundary.bounding_rect() {
            bounds = Some(match bounds {
                None => rect,
                Some(b) => geo::Rect::new(
                    Coord {
                        x: b.min().x.min(rect.min().x),
                        y: b.min().y.min(rect.min().y),
                    },
                    Coord {
                        x: b.max().x.max(rect.max().x),
                        y: b.max().y.max(rect.max().y),
                    },
                ),
            });
        }
    }
    let Some(bounds) = bounds else {
        return "<svg xmlns=\"http://www.w3.org/2000/svg\"/>".into();
    };
    let kx = bounds.center().y.to_radians().cos();
    let (w, h) = (bounds.width() * kx, bounds.height());
    let scale = SVG_SIDE_PIXELS / w.max(h).max(1e-12);
    let (width, height) = (w * scale + 20.0, h * scale + 20.0);
    let px = |c: Coord<f64>| {
        (
            10.0 + (c.x - bounds.min().x) * kx * scale,
            10.0 + (bounds.max().y - c.y) * scale,
        )
    };
    let path = |polygon: &Polygon<f64>| {
        let mut d = String::new();
        for ring in std::iter::once(polygon.exterior()).chain(polygon.interiors()) {
            for (i, c) in ring.coords().enumerate() {
                let (x, y) = px(*c);
                let _ = write!(d, "{}{x:.1},{y:.1}", if i == 0 { "M" } else { "L" });
            }
            d.push('Z');
        }
        d
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    let positions: HashMap<&str, &Point<f64>> = communities
        .iter()
        .flat_map(|c| &c.buildings)
        .map(|b| (b.id.as_str(), &b.position))
        .collect();
    for (index, grid) in partitions.iter().flat_map(|p| &p.grids).enumerate() {
        let hue = (index as f64 * 137.508) % 360.0;
        let stroke = if grid.flags.is_empty() {
            "#333"
        } else {
            "#d00"
        };
        let _ = writeln!(
            svg,
            "<path d=\"{}\" fill=\"hsl({hue:.0},70%,80%)\" stroke=\"{stroke}\" stroke-width=\"0.8\"><title>{} {} households {:?}</title></path>",
            std::iter::once(&grid.polygon)
                .chain(&grid.detached)
                .map(path)
                .collect::<String>(),
            grid.grid_code,
            grid.households,
            grid.flags.iter().map(|f| f.as_str()).collect::<Vec<_>>()
        );
        for member in &grid.members {
            let building = member.split('#').next().unwrap_or(member);
            if let Some(p) = positions.get(building) {
                let (x, y) = px(p.0);
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"1.6\" fill=\"hsl({hue:.0},80%,35%)\"/>"
                );
            }
        }
        if let Some(c) = grid.polygon.centroid() {
            let (x, y) = px(c.0);
            let _ = writeln!(
                svg,
                "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"7\" text-anchor=\"middle\">{}</text>",
                &grid.grid_code[grid.grid_code.len().saturating_sub(3)..]
            );
        }
    }
    for community in communities {
        for polygon in community.boundary.iter() {
            let _ = writeln!(
                svg,
                "<path d=\"{}\" fill=\"none\" stroke=\"black\" stroke-width=\"2\"><title>{} {}</title></path>",
                path(polygon),
                community.id,
                community.code
            );
        }
    }
    if let Some(attribution) = attribution {
        let escaped = attribution
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let _ = writeln!(
            svg,
            "<text x=\"{:.0}\" y=\"{:.0}\" font-size=\"8\" text-anchor=\"end\">{escaped}</text>",
            width - 4.0,
            height - 3.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

// ---------------------------------------------------------------- OpenStreetMap import

pub fn import(command: ImportCommand) -> anyhow::Result<()> {
    match command {
        ImportCommand::Osm(args) => {
            let collection = osm::import(&args.file, args.seed)?;
            let text = serde_json::to_string(&collection)?;
            match &args.out {
                Some(path) => write_file(path, &text),
                None => {
                    println!("{text}");
                    Ok(())
                }
            }
        }
    }
}

/// OpenStreetMap extract → wangge GeoJSON. Rules (documented in docs/PARTITION.md):
/// - buildings: closed ways tagged `building=*`; position = footprint centroid.
/// - households, seeded by (seed, way id): `building:flats` when tagged; else by type —
///   house/detached/semidetached_house/bungalow/farm 1, terrace area/80 m², apartments and
///   residential levels × area × 0.8 / 90 m², `yes` levels × area / 120 m² if the footprint is
///   over 60 m² (else 0), every other type (shops, schools, sheds, ...) 0; the area-based ones
///   are then scaled by a seeded factor in [0.85, 1.15]. Levels: `building:levels`, else 5 for
///   apartments and 2 otherwise. Buildings over 80 households get units of about 40.
/// - communities: OSM has no 社区 boundaries, and `landuse=residential` areas are housing
///   estates (小区) of a few dozen households, far below a community's 1,000–3,000. So the
///   extract is cut into a square lattice whose side is chosen for about
///   `COMMUNITY_HOUSEHOLDS_TARGET` households per cell (clamped to 300 m–2 km); every cell
///   holding a building is a community, buildings belong to the cell of their centroid.
mod osm {
    use std::collections::HashMap;
    use std::path::Path;

    use anyhow::Context as _;
    use geo::{Area, Centroid, Coord, LineString, Polygon, Rect};
    use osmpbf::{Element, ElementReader};
    use serde_json::{Value, json};

    /// Bound on nodes kept in memory (a city extract; a country needs a different tool).
    const NODES_MAX: usize = 50_000_000;
    /// Households a synthetic lattice community aims at.
    const COMMUNITY_HOUSEHOLDS_TARGET: f64 = 2_000.0;
    const LATTICE_MIN_METRES: f64 = 300.0;
    const LATTICE_MAX_METRES: f64 = 2_000.0;
    const METRES_PER_DEGREE: f64 = 111_320.0;
    /// Buildings above this many households are given units.
    const UNITS_ABOVE_HOUSEHOLDS: u32 = 80;
    /// Households per unit when a big building is split into units.
    const UNIT_HOUSEHOLDS: u32 = 40;

    struct Way {
        id: i64,
        tags: HashMap<String, String>,
        refs: Vec<i64>,
    }

    /// An .osm.pbf file opens with a block header whose type is `OSMHeader` (after its 4-byte
    /// length): protobuf field 1, a string of 9 bytes.
    const PBF_OPENING: &[u8] = b"\x0a\x09OSMHeader";

    pub(super) fn import(path: &Path, seed: u64) -> anyhow::Result<Value> {
        let mut opening = [0u8; 4 + PBF_OPENING.len()];
        let read = std::io::Read::read(
            &mut std::fs::File::open(path)
                .with_context(|| format!("opening {}", path.display()))?,
            &mut opening,
        )
        .with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            read == opening.len() && opening[4..] == *PBF_OPENING,
            "{} is not an OpenStreetMap .osm.pbf file (it does not open with an OSMHeader \
             block); export the area as PBF, or convert .osm XML with `osmium cat in.osm -o out.osm.pbf`",
            path.display()
        );
        let reader = ElementReader::from_path(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut nodes: HashMap<i64, Coord<f64>> = HashMap::new();
        let mut ways: Vec<Way> = Vec::new();
        let mut too_many = false;
        let mut keep_node = |id: i64, lon: f64, lat: f64| {
            if nodes.len() < NODES_MAX {
                nodes.insert(id, Coord { x: lon, y: lat });
            } else {
                too_many = true;
            }
        };
        reader
            .for_each(|element| match element {
                Element::Node(n) => keep_node(n.id(), n.lon(), n.lat()),
                Element::DenseNode(n) => keep_node(n.id(), n.lon(), n.lat()),
                Element::Way(w) => {
                    let tags: HashMap<String, String> = w
                        .tags()
                        .filter(|(k, _)| {
                            matches!(*k, "building" | "building:levels" | "building:flats")
                        })
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    if tags.contains_key("building") {
                        ways.push(Way {
                            id: w.id(),
                            tags,
                            refs: w.refs().collect(),
                        });
                    }
                }
                Element::Relation(_) => {}
            })
            .with_context(|| format!("reading {}", path.display()))?;
        if too_many {
            anyhow::bail!(
                "{}: more than {NODES_MAX} nodes; cut a smaller extract",
                path.display()
            );
        }
        let mut buildings: Vec<(i64, Polygon<f64>, Coord<f64>, u32)> = Vec::new();
        let mut skipped = 0usize;
        for way in &ways {
            let coords: Option<Vec<Coord<f64>>> =
                way.refs.iter().map(|r| nodes.get(r).copied()).collect();
            let polygon = coords
                .filter(|c| c.len() >= 4 && c.first() == c.last())
                .map(|c| Polygon::new(LineString::new(c), vec![]))
                .filter(geo::algorithm::Validation::is_valid);
            let Some((polygon, centroid)) = polygon.and_then(|p| p.centroid().map(|c| (p, c.0)))
            else {
                skipped += 1;
                continue;
            };
            let kx = METRES_PER_DEGREE * centroid.y.to_radians().cos();
            let area_m2 = polygon.unsigned_area() * kx * METRES_PER_DEGREE;
            buildings.push((
                way.id,
                polygon,
                centroid,
                households(seed, way.id, &way.tags, area_m2),
            ));
        }
        let Some(bounds) = buildings
            .iter()
            .fold(None::<Rect<f64>>, |acc, (_, _, c, _)| {
                Some(match acc {
                    None => Rect::new(*c, *c),
                    Some(r) => Rect::new(
                        Coord {
                            x: r.min().x.min(c.x),
                            y: r.min().y.min(c.y),
                        },
                        Coord {
                            x: r.max().x.max(c.x),
                            y: r.max().y.max(c.y),
                        },
                    ),
                })
            })
        else {
            anyhow::bail!("{}: no building ways", path.display());
        };
        let kx = METRES_PER_DEGREE * bounds.center().y.to_radians().cos();
        let (width, height) = (bounds.width() * kx, bounds.height() * METRES_PER_DEGREE);
        let total: f64 = buildings
            .iter()
            .map(|b| f64::from(b.3))
            .sum::<f64>()
            .max(1.0);
        let side = (width * height * COMMUNITY_HOUSEHOLDS_TARGET / total)
            .sqrt()
            .clamp(LATTICE_MIN_METRES, LATTICE_MAX_METRES);
        // Centre the lattice on the buildings so edge cells are not needlessly thin.
        let columns = (width / side).ceil().max(1.0);
        let rows = (height / side).ceil().max(1.0);
        let origin = Coord {
            x: bounds.center().x - columns * side / 2.0 / kx,
            y: bounds.center().y - rows * side / 2.0 / METRES_PER_DEGREE,
        };
        let corner = |i: i64, j: i64| Coord {
            x: origin.x + i as f64 * side / kx,
            y: origin.y + j as f64 * side / METRES_PER_DEGREE,
        };
        let cell_of = |c: Coord<f64>| {
            (
                ((c.x - origin.x) * kx / side).floor() as i64,
                ((c.y - origin.y) * METRES_PER_DEGREE / side).floor() as i64,
            )
        };
        let mut cells: Vec<(i64, i64)> = buildings.iter().map(|b| cell_of(b.2)).collect();
        cells.sort_unstable();
        cells.dedup();
        let mut features = Vec::new();
        for &(i, j) in &cells {
            let ring = vec![
                corner(i, j),
                corner(i + 1, j),
                corner(i + 1, j + 1),
                corner(i, j + 1),
                corner(i, j),
            ];
            features.push(json!({"type": "Feature",
                "properties": {"kind": "community", "id": format!("osm-cell-{i}-{j}"), "source": format!("synthetic {side:.0} m lattice")},
                "geometry": polygon_json(&Polygon::new(LineString::new(ring), vec![]))}));
        }
        for (id, footprint, centroid, households) in &buildings {
            let (i, j) = cell_of(*centroid);
            let mut properties = json!({"kind": "building", "id": format!("w{id}"), "households": households, "community": format!("osm-cell-{i}-{j}")});
            if *households > UNITS_ABOVE_HOUSEHOLDS {
                let count = households.div_ceil(UNIT_HOUSEHOLDS);
                let units: Vec<Value> = (0..count)
                    .map(|u| json!({"id": format!("{}", u + 1), "households": households / count + u32::from(u < households % count)}))
                    .collect();
                properties["units"] = Value::Array(units);
            }
            features.push(json!({"type": "Feature", "properties": properties, "geometry": polygon_json(footprint)}));
        }
        eprintln!(
            "imported {} buildings ({} households) into {} lattice communities of {side:.0} m; {skipped} building ways skipped (open or invalid)",
            buildings.len(),
            total,
            cells.len()
        );
        Ok(json!({"type": "FeatureCollection",
            "attribution": "© OpenStreetMap contributors, ODbL 1.0 (https://www.openstreetmap.org/copyright)",
            "features": features}))
    }

    fn polygon_json(polygon: &Polygon<f64>) -> Value {
        let ring = |r: &LineString<f64>| {
            r.coords()
                .map(|c| json!([(c.x * 1e7).round() / 1e7, (c.y * 1e7).round() / 1e7]))
                .collect::<Vec<_>>()
        };
        let mut rings = vec![ring(polygon.exterior())];
        rings.extend(polygon.interiors().iter().map(ring));
        json!({"type": "Polygon", "coordinates": rings})
    }

    /// The documented, seeded household rule (see the module docs).
    pub(super) fn households(
        seed: u64,
        way_id: i64,
        tags: &HashMap<String, String>,
        area_m2: f64,
    ) -> u32 {
        if let Some(flats) = tags
            .get("building:flats")
            .and_then(|v| v.parse::<u32>().ok())
        {
            return flats.min(2_000);
        }
        let kind = tags.get("building").map(String::as_str).unwrap_or("yes");
        let levels = tags
            .get("building:levels")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|l| (1.0..=100.0).contains(l))
            .unwrap_or(if kind == "apartments" { 5.0 } else { 2.0 });
        let base = match kind {
            "house" | "detached" | "semidetached_house" | "bungalow" | "farm" => return 1,
            "terrace" => area_m2 / 80.0,
            "apartments" | "residential" => levels * area_m2 * 0.8 / 90.0,
            "yes" if area_m2 > 60.0 => levels * area_m2 / 120.0,
            _ => return 0,
        };
        let mut rng = partition::synthetic::SplitMix64::new(
            seed ^ (way_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let factor = 0.85 + 0.3 * rng.unit();
        (base * factor).round().clamp(0.0, 2_000.0) as u32
    }
}

// ---------------------------------------------------------------- benchmarks

#[derive(Debug, clap::Args)]
pub struct BenchPartitionArgs {
    /// Buildings in the synthetic city.
    #[arg(long, default_value_t = 1_000_000)]
    buildings: usize,
    /// Buildings per community.
    #[arg(long, default_value_t = 2_000)]
    per_community: usize,
    /// Seed of the synthetic city.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchLocateArgs {
    /// Buildings in the synthetic city whose grids are indexed (500,000 gives ~50,000 grids).
    #[arg(long, default_value_t = 500_000)]
    buildings: usize,
    /// Lookups to time.
    #[arg(long, default_value_t = 5_000_000)]
    lookups: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// CPU seconds (user + system) used so far by `/proc/<which>/stat` (`self` for the process,
/// `thread-self` for the calling thread): a figure the other jobs sharing the machine do not
/// distort, printed beside wall-clock seconds. Assumes the usual 100 clock ticks per second.
fn cpu_seconds(which: &str) -> f64 {
    const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
    std::fs::read_to_string(format!("/proc/{which}/stat"))
        .ok()
        .and_then(|stat| {
            let after_name = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            // Fields 14 and 15 of stat(5) (utime, stime) are 12 and 13 after the name.
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / CLOCK_TICKS_PER_SECOND)
        })
        .unwrap_or(0.0)
}

pub fn bench_partition(args: BenchPartitionArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let city = partition::synthetic::city(args.seed, args.buildings, args.per_community);
    let generated = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let cpu_before = cpu_seconds("self");
    let results = partition_all(&city);
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds("self") - cpu_before;
    let mut total = Quality::default();
    let mut failed = 0;
    for result in &results {
        match result {
            Ok(p) => total.merge(&p.quality),
            Err(error) => {
                failed += 1;
                eprintln!("{error}");
            }
        }
    }
    if !args.json {
        eprintln!(
            "generated {} communities in {generated:.2} s; partitioned in {seconds:.2} s",
            city.len()
        );
    }
    let line = json!({
        "buildings": total.buildings,
        "communities": city.len(),
        "failed_communities": failed,
        "grids": total.grids,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "generate_seconds": generated,
        "peak_rss_bytes": peak_rss_bytes(),
        "in_range_share": total.in_range_share(),
        "disconnected": total.disconnected,
        "flagged": total.flagged,
        "pp_median": total.polsby_popper_quantile(0.5),
        "pp_p10": total.polsby_popper_quantile(0.1),
    });
    println!("{line}");
    Ok(())
}

pub fn bench_locate(args: BenchLocateArgs) -> anyhow::Result<()> {
    let city = partition::synthetic::city(args.seed, args.buildings, 2_000);
    let results = partition_all(&city);
    let grids: Vec<(String, String, Polygon<f64>)> = results
        .into_iter()
        .flatten()
        .flat_map(|p| p.grids)
        .map(|g| (g.grid_code, g.community_id, g.polygon))
        .collect();
    let grid_count = grids.len();
    let started = std::time::Instant::now();
    let index = partition::locate::LocateIndex::build(grids)?;
    let build_seconds = started.elapsed().as_secs_f64();
    // Query points: building positions (served) mixed with points outside (unserved).
    let mut rng = partition::synthetic::SplitMix64::new(args.seed ^ 0xA5A5);
    let bounds = city
        .iter()
        .filter_map(|c| c.boundary.bounding_rect())
        .reduce(|a, b| {
            geo::Rect::new(
                Coord {
                    x: a.min().x.min(b.min().x),
                    y: a.min().y.min(b.min().y),
                },
                Coord {
                    x: a.max().x.max(b.max().x),
                    y: a.max().y.max(b.max().y),
                },
            )
        })
        .ok_or_else(|| anyhow::anyhow!("empty city"))?;
    let points: Vec<(f64, f64)> = (0..args.lookups.min(1 << 20))
        .map(|_| {
            (
                bounds.min().x + rng.unit() * bounds.width(),
                bounds.min().y + rng.unit() * bounds.height(),
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let cpu_before = cpu_seconds("thread-self");
    let mut served = 0usize;
    for i in 0..args.lookups {
        let (lon, lat) = points[i % points.len()];
        if let partition::locate::Located::Grid { .. } = index.locate(lon, lat) {
            served += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds("thread-self") - cpu_before;
    let line = json!({
        "grids": grid_count,
        "cpu_seconds": cpu,
        "lookups_per_cpu_s": args.lookups as f64 / cpu.max(1e-9),
        "lookups": args.lookups,
        "served_share": served as f64 / args.lookups.max(1) as f64,
        "build_seconds": build_seconds,
        "seconds": seconds,
        "lookups_per_s": args.lookups as f64 / seconds.max(1e-9),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_items_with_reasons() {
        let text = r#"{"type":"FeatureCollection","features":[
          {"type":"Feature","properties":{"kind":"community","id":"c1"},"geometry":{"type":"Polygon","coordinates":[[[0,0],[0.01,0],[0.01,0.01],[0,0.01],[0,0]]]}},
          {"type":"Feature","properties":{"kind":"building","id":"b1","households":-3},"geometry":{"type":"Point","coordinates":[0.005,0.005]}},
          {"type":"Feature","properties":{"kind":"building","id":"b2","households":10},"geometry":{"type":"Point","coordinates":[5,5]}}
        ]}"#;
        let input = parse_input(text).expect("file is fine");
        let reasons: Vec<String> = input
            .rejected
            .iter()
            .map(|r| format!("{} {}: {}", r.kind, r.id, r.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                "building b1: households -3 is negative",
                "building b2: outside every community"
            ]
        );
    }
}
