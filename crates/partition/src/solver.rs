//! The partition itself: sites, triangulation, first cut, repair, refinement, geometry, codes.

use std::collections::{HashMap, HashSet};

use geo::{
    BooleanOps, BoundingRect, Coord, Distance, Euclidean, Intersects, Line, LineString,
    MultiPolygon, Polygon, Rect,
};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::{AABB, RTree};
use spade::{DelaunayTriangulation, Point2, Triangulation};

use crate::geometry::{
    Projection, hilbert_key, multipolygon_area, perimeter, polsby_popper, sample_ring, signed_area,
};
use crate::{
    BOUNDARY_VERTICES_MAX, BUILDINGS_PER_COMMUNITY_MAX, COMMUNITY_EXTENT_MAX_METRES,
    CommunityInput, Flag, GRIDS_PER_COMMUNITY_MAX, Grid, HOUSEHOLDS_MAX, HOUSEHOLDS_MIN,
    HOUSEHOLDS_TARGET, Partition, PartitionError, Quality, UNITS_PER_BUILDING_MAX,
};

const NONE: u32 = u32::MAX;
/// Refinement sweeps over all sites; each sweep strictly lowers (penalty, spread), so this is
/// only a bound on work, rarely reached.
const REFINE_PASSES_MAX: usize = 40;
/// Sweeps of local balancing in `repartition` (penalty moves only).
const LOCAL_PASSES_MAX: usize = 20;
/// Boundary sampling spacing never goes below this (metres), bounding territory sites.
const TERRITORY_SPACING_MIN_METRES: f64 = 8.0;
/// Nor above this: keeps cells near the boundary from reaching across notches.
const TERRITORY_SPACING_MAX_METRES: f64 = 60.0;
/// Cells along the longer side of the boundary raster (cells are never under 8 m).
const RASTER_SIDE_CELLS: usize = 128;
/// Bound on the boundary raster's cells.
const RASTER_CELLS_MAX: usize = 1 << 20;
/// How far (degrees, ~10 m) from a site `repartition` looks for the previous grid holding it.
const TERRITORY_PROBE_DEGREES: f64 = 1e-4;
/// Ratio between successive allowed territory spacings.
const TERRITORY_SPACING_STEP: f64 = 1.25;
/// Most sites sampled along a community's boundary between its vertices: the spacing grows
/// for a boundary so long that the usual one would sample more (no residential community
/// comes near: 100,000 × 60 m is 6,000 km of boundary), so memory and time stay bounded by
/// the input's vertices ([`BOUNDARY_VERTICES_MAX`]) plus this.
const TERRITORY_SITES_MAX: usize = 100_000;
/// Spacing (metres) between the sites of a building's units along its long axis.
const UNIT_SPACING_METRES: f64 = 3.0;
/// Largest number of household-free sites (territory, empty buildings) carried along with a
/// site moving to another grid because they would be cut off from their grid without it.
const CARRY_SITES_MAX: usize = 64;
/// Rounds of the balanced power-diagram first cut.
const POWER_ITERATIONS: usize = 30;
/// Centres each site weighs in one round: the nearest centres of its current centre (that
/// one included). 8 gives the same synthetic city as 12 for 11% less CPU.
const POWER_CANDIDATES: usize = 8;
/// Bias step, as a share of a grid's mean squared radius per unit of relative imbalance.
const POWER_STEP: f64 = 0.5;
/// Rounds between refreshes of each site's nearest centres.
const POWER_REFRESH_ROUNDS: usize = 6;

/// What a site stands for.
#[derive(Debug, Clone, Copy)]
struct Item {
    building: u32,
    /// Index into the building's units, or NONE for a building without units.
    unit: u32,
    population: u32,
}

struct Sites {
    position: Vec<Coord<f64>>,
    weight: Vec<u32>,
    /// None for a zero-weight territory site sampled on the boundary.
    item: Vec<Option<Item>>,
    hilbert: Vec<u64>,
    adjacency_start: Vec<u32>,
    adjacency: Vec<u32>,
    /// Per site, its Voronoi cell as (neighbour site or NONE, face index), counter-clockwise.
    cell_start: Vec<u32>,
    cell: Vec<(u32, u32)>,
    circumcenter: Vec<Coord<f64>>,
}

impl Sites {
    fn len(&self) -> usize {
        self.position.len()
    }

    fn neighbours(&self, site: usize) -> &[u32] {
        &self.adjacency
            [self.adjacency_start[site] as usize..self.adjacency_start[site + 1] as usize]
    }

    fn cell(&self, site: usize) -> &[(u32, u32)] {
        &self.cell[self.cell_start[site] as usize..self.cell_start[site + 1] as usize]
    }
}

struct Community<'a> {
    input: &'a CommunityInput,
    projection: Projection,
    boundary: MultiPolygon<f64>,
    boundary_segments: RTree<GeomWithData<Rectangle<[f64; 2]>, Line<f64>>>,
    area: f64,
    sites: Sites,
}

fn penalty(households: u64) -> u64 {
    let (min, max) = (u64::from(HOUSEHOLDS_MIN), u64::from(HOUSEHOLDS_MAX));
    min.saturating_sub(households) + households.saturating_sub(max)
}

/// Number of grids for `households`, preferring an in-range even split nearest the target.
fn grid_count_for(households: u64) -> usize {
    if households <= u64::from(HOUSEHOLDS_MAX) {
        return 1;
    }
    let low = (households / u64::from(HOUSEHOLDS_MAX)).max(1);
    let high = households.div_ceil(u64::from(HOUSEHOLDS_MIN)) + 1;
    let score = |k: u64| {
        let average = households as f64 / k as f64;
        let total_penalty = k as f64 * penalty(average.round() as u64) as f64;
        (
            total_penalty,
            (average - f64::from(HOUSEHOLDS_TARGET)).abs(),
        )
    };
    let mut best = low;
    for k in low..=high {
        if score(k).partial_cmp(&score(best)) == Some(std::cmp::Ordering::Less) {
            best = k;
        }
    }
    best as usize
}

fn segment_key(line: Line<f64>) -> GeomWithData<Rectangle<[f64; 2]>, Line<f64>> {
    let rect = Rectangle::from_corners(
        [line.start.x.min(line.end.x), line.start.y.min(line.end.y)],
        [line.start.x.max(line.end.x), line.start.y.max(line.end.y)],
    );
    GeomWithData::new(rect, line)
}

impl<'a> Community<'a> {
    fn build(input: &'a CommunityInput) -> Result<Community<'a>, PartitionError> {
        let community = input.id.clone();
        if input.code.len() != 12 || !input.code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PartitionError::BadCommunityCode {
                community,
                code: input.code.clone(),
            });
        }
        if input.buildings.len() > BUILDINGS_PER_COMMUNITY_MAX {
            return Err(PartitionError::TooManyBuildings {
                community,
                buildings: input.buildings.len(),
                max: BUILDINGS_PER_COMMUNITY_MAX,
            });
        }
        let vertices: usize = input
            .boundary
            .iter()
            .map(|p| p.exterior().0.len() + p.interiors().iter().map(|r| r.0.len()).sum::<usize>())
            .sum();
        if vertices > BOUNDARY_VERTICES_MAX {
            return Err(PartitionError::BoundaryTooLarge {
                community,
                vertices,
                max: BOUNDARY_VERTICES_MAX,
            });
        }
        let bad_boundary = || PartitionError::BadBoundary {
            community: input.id.clone(),
        };
        let bbox = input.boundary.bounding_rect().ok_or_else(bad_boundary)?;
        if !(bbox.min().x.is_finite()
            && bbox.max().x.is_finite()
            && bbox.min().y.is_finite()
            && bbox.max().y.is_finite())
        {
            return Err(bad_boundary());
        }
        let projection = Projection::around(bbox.center());
        let boundary: MultiPolygon<f64> = input
            .boundary
            .iter()
            .map(|p| projection.forward_polygon(p))
            .collect();
        let area = multipolygon_area(&boundary);
        if area <= 0.0 {
            return Err(bad_boundary());
        }
        let extent = bbox_size(&boundary);
        if extent > COMMUNITY_EXTENT_MAX_METRES {
            return Err(PartitionError::CommunityTooLarge {
                community,
                extent_m: extent.round() as u64,
                max_m: COMMUNITY_EXTENT_MAX_METRES as u64,
            });
        }
        let boundary_segments = RTree::bulk_load(
            boundary
                .iter()
                .flat_map(|p| std::iter::once(p.exterior()).chain(p.interiors()))
                .flat_map(|ring| ring.lines())
                .map(segment_key)
                .collect(),
        );

        // Items: buildings, or their units.
        let mut position = Vec::new();
        let mut weight = Vec::new();
        let mut item = Vec::new();
        for (index, building) in input.buildings.iter().enumerate() {
            let bad = |reason: String| PartitionError::BadBuilding {
                community: input.id.clone(),
                building: building.id.clone(),
                reason,
            };
            let at = projection.forward(building.position.0);
            if !at.x.is_finite() || !at.y.is_finite() {
                return Err(bad("position is not finite".into()));
            }
            if !boundary.intersects(&at) {
                return Err(bad("position is outside the community boundary".into()));
            }
            if building.units.len() > UNITS_PER_BUILDING_MAX {
                return Err(bad(format!(
                    "{} units, more than {UNITS_PER_BUILDING_MAX}",
                    building.units.len()
                )));
            }
            let population = building.population.unwrap_or(0);
            if building.units.is_empty() {
                position.push(at);
                weight.push(building.households);
                item.push(Some(Item {
                    building: index as u32,
                    unit: NONE,
                    population,
                }));
                continue;
            }
            let unit_sum: u64 = building.units.iter().map(|u| u64::from(u.households)).sum();
            if unit_sum != u64::from(building.households) {
                return Err(bad(format!(
                    "households {} differ from the sum of its units {unit_sum}",
                    building.households
                )));
            }
            // Units sit along the footprint's long axis (entrances usually do), else east-west.
            let (axis, half_length) = match &building.footprint {
                Some(footprint) => match projection.forward_polygon(footprint).bounding_rect() {
                    Some(rect) if rect.width() >= rect.height() => {
                        (Coord { x: 1.0, y: 0.0 }, rect.width() * 0.35)
                    }
                    Some(rect) => (Coord { x: 0.0, y: 1.0 }, rect.height() * 0.35),
                    None => (Coord { x: 1.0, y: 0.0 }, 0.0),
                },
                None => (Coord { x: 1.0, y: 0.0 }, 0.0),
            };
            let count = building.units.len();
            let spread = half_length.max(UNIT_SPACING_METRES * (count as f64 - 1.0) / 2.0);
            let units_population = split_evenly(population, &building.units);
            for (unit_index, unit) in building.units.iter().enumerate() {
                let t = if count == 1 {
                    0.0
                } else {
                    unit_index as f64 / (count - 1) as f64 * 2.0 - 1.0
                };
                let mut unit_at = Coord {
                    x: at.x + axis.x * spread * t,
                    y: at.y + axis.y * spread * t,
                };
                if !boundary.intersects(&unit_at) {
                    unit_at = at;
                }
                position.push(unit_at);
                weight.push(unit.households);
                item.push(Some(Item {
                    building: index as u32,
                    unit: unit_index as u32,
                    population: units_population[unit_index],
                }));
            }
        }

        // The grids the first cut will draw, refused before any triangulation when over the
        // bound: each item over HOUSEHOLDS_MAX alone, the rest in even runs (as `cut` does).
        let oversize = weight.iter().filter(|w| **w > HOUSEHOLDS_MAX).count();
        let rest: u64 = weight
            .iter()
            .filter(|w| **w <= HOUSEHOLDS_MAX)
            .map(|w| u64::from(*w))
            .sum();
        let planned = oversize + if rest > 0 { grid_count_for(rest) } else { 0 };
        if planned > GRIDS_PER_COMMUNITY_MAX {
            return Err(PartitionError::TooManyGrids {
                community: input.id.clone(),
                grids: planned,
                max: GRIDS_PER_COMMUNITY_MAX,
            });
        }

        // Territory: the boundary, sampled about one building spacing apart.
        // Quantised to steps of 25%, so that adding or removing a few buildings leaves the
        // territory sites (and so the graph near the boundary) exactly as they were.
        let raw_spacing = (area / position.len().max(1) as f64).sqrt();
        let steps = (raw_spacing.max(TERRITORY_SPACING_MIN_METRES) / TERRITORY_SPACING_MIN_METRES)
            .log(TERRITORY_SPACING_STEP)
            .round();
        let boundary_length: f64 = boundary.iter().map(perimeter).sum();
        let spacing = (TERRITORY_SPACING_MIN_METRES * TERRITORY_SPACING_STEP.powf(steps))
            .clamp(TERRITORY_SPACING_MIN_METRES, TERRITORY_SPACING_MAX_METRES)
            .max(boundary_length / TERRITORY_SITES_MAX as f64);
        let mut territory = Vec::new();
        for polygon in boundary.iter() {
            sample_ring(polygon.exterior(), spacing, &mut territory);
            for ring in polygon.interiors() {
                sample_ring(ring, spacing, &mut territory);
            }
        }
        for at in territory {
            position.push(at);
            weight.push(0);
            item.push(None);
        }
        separate_duplicates(&mut position);

        let size = bbox_size(&boundary);
        let min = boundary
            .bounding_rect()
            .map(|r| r.min())
            .unwrap_or_default();
        let hilbert = position
            .iter()
            .map(|c| hilbert_key(*c, min, size))
            .collect();

        let sites = triangulate(
            input,
            position,
            weight,
            item,
            hilbert,
            &boundary,
            &boundary_segments,
            size,
        )?;
        Ok(Community {
            input,
            projection,
            boundary,
            boundary_segments,
            area,
            sites,
        })
    }

    /// Does an edge between two sites stay inside the community?
    fn member_key(&self, item: Item) -> String {
        let building = &self.input.buildings[item.building as usize];
        if item.unit == NONE {
            building.id.clone()
        } else {
            format!("{}#{}", building.id, building.units[item.unit as usize].id)
        }
    }
}

fn split_evenly(population: u32, units: &[crate::UnitInput]) -> Vec<u32> {
    let households: u64 = units.iter().map(|u| u64::from(u.households)).sum();
    if households == 0 {
        return vec![0; units.len()];
    }
    units
        .iter()
        .map(|u| (u64::from(population) * u64::from(u.households) / households) as u32)
        .collect()
}

fn bbox_size(boundary: &MultiPolygon<f64>) -> f64 {
    boundary
        .bounding_rect()
        .map(|r| r.width().max(r.height()))
        .unwrap_or(1.0)
        .max(1.0)
}

/// Nudge exactly coincident sites apart (a few millimetres, deterministic) so the
/// triangulation keeps one vertex per site.
fn separate_duplicates(position: &mut [Coord<f64>]) {
    let mut seen: HashSet<(i64, i64)> = HashSet::with_capacity(position.len());
    for (index, at) in position.iter_mut().enumerate() {
        let mut attempt = 0u32;
        loop {
            let key = (
                (at.x * 1000.0).round() as i64,
                (at.y * 1000.0).round() as i64,
            );
            if seen.insert(key) {
                break;
            }
            attempt += 1;
            let angle = f64::from(attempt) * 2.399_963 + index as f64 * 0.7;
            at.x += 0.005 * angle.cos() * f64::from(attempt);
            at.y += 0.005 * angle.sin() * f64::from(attempt);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn triangulate(
    input: &CommunityInput,
    position: Vec<Coord<f64>>,
    weight: Vec<u32>,
    item: Vec<Option<Item>>,
    hilbert: Vec<u64>,
    boundary: &MultiPolygon<f64>,
    boundary_segments: &RTree<GeomWithData<Rectangle<[f64; 2]>, Line<f64>>>,
    size: f64,
) -> Result<Sites, PartitionError> {
    let real = position.len();
    let center = boundary
        .bounding_rect()
        .map(|r| r.center())
        .unwrap_or_default();
    let mut vertices: Vec<Point2<f64>> = position.iter().map(|c| Point2::new(c.x, c.y)).collect();
    // A far frame keeps every real site's Voronoi cell bounded.
    let far = size * 8.0 + 100.0;
    for step in 0..8 {
        let angle = f64::from(step) * std::f64::consts::FRAC_PI_4 + 0.1;
        vertices.push(Point2::new(
            center.x + far * angle.cos(),
            center.y + far * angle.sin(),
        ));
    }
    let failed = |reason: String| PartitionError::Triangulation {
        community: input.id.clone(),
        reason,
    };
    let triangulation: DelaunayTriangulation<Point2<f64>> =
        DelaunayTriangulation::bulk_load_stable(vertices)
            .map_err(|error| failed(format!("{error:?}")))?;
    if triangulation.num_vertices() != real + 8 {
        return Err(failed("coincident sites".into()));
    }
    let mut circumcenter = vec![Coord::default(); triangulation.num_all_faces()];
    for face in triangulation.inner_faces() {
        let c = face.circumcenter();
        circumcenter[face.fix().index()] = Coord { x: c.x, y: c.y };
    }
    // Does the open segment a–b leave the community? (A crossing within a millimetre of an
    // end is a boundary site touching its own segment — floating-point noise, not a crossing.)
    let segment_leaves = |a: Coord<f64>, b: Coord<f64>| -> bool {
        let envelope =
            AABB::from_corners([a.x.min(b.x), a.y.min(b.y)], [a.x.max(b.x), a.y.max(b.y)]);
        let edge = Line::new(a, b);
        for segment in boundary_segments.locate_in_envelope_intersecting(&envelope) {
            if let Some(geo::LineIntersection::SinglePoint {
                is_proper: true,
                intersection,
            }) = geo::line_intersection::line_intersection(edge, segment.data)
                && dist2(intersection, a).min(dist2(intersection, b)) > 1e-6
            {
                return true;
            }
        }
        false
    };
    // Two sites are neighbours when their clipped cells share a border of positive length
    // *and* that border is reachable from both sites inside the community: some point p of
    // their Voronoi border lies inside, and the segments from each site to p do not leave the
    // community (cells are convex, so those segments stay in the sites' own cell pieces).
    // Then graph-connected grids are geometrically connected after clipping, whatever notches
    // the boundary has; a cell piece cut off from its own site holds no site at all.
    let raster = BoundaryRaster::new(boundary);
    let rings = FlatRings::new(boundary);
    let extent = boundary.bounding_rect().unwrap_or(Rect::new(
        Coord { x: 0.0, y: 0.0 },
        Coord { x: 0.0, y: 0.0 },
    ));
    let shares_inner_border = |a: Coord<f64>, b: Coord<f64>, c: Coord<f64>, d: Coord<f64>| {
        const SAMPLES: [f64; 5] = [0.5, 0.25, 0.75, 0.1, 0.9];
        let scale = dist2(a, b).max(1e-6);
        if dist2(c, d) <= 1e-12 * scale {
            // A zero-length border: the cells touch at a point only.
            return false;
        }
        // Cells on the hull reach far out: only the part of the border within the
        // community's extent can be inside it.
        let Some((c, d)) = clip_to_rect(c, d, extent) else {
            return false;
        };
        let envelope = AABB::from_corners(
            [
                a.x.min(b.x).min(c.x).min(d.x),
                a.y.min(b.y).min(c.y).min(d.y),
            ],
            [
                a.x.max(b.x).max(c.x).max(d.x),
                a.y.max(b.y).max(c.y).max(d.y),
            ],
        );
        if !raster.any_marked(&envelope) {
            // Nothing of the boundary near: the sites are inside, so all of it is.
            return true;
        }
        // Cut the border where it crosses the boundary; each piece is wholly inside or
        // wholly outside, so its middle tells which.
        let mut cuts = vec![0.0f64, 1.0];
        let border = Line::new(c, d);
        let length2 = dist2(c, d);
        let param =
            |p: Coord<f64>| ((p.x - c.x) * (d.x - c.x) + (p.y - c.y) * (d.y - c.y)) / length2;
        for segment in boundary_segments.locate_in_envelope_intersecting(&AABB::from_corners(
            [c.x.min(d.x), c.y.min(d.y)],
            [c.x.max(d.x), c.y.max(d.y)],
        )) {
            match geo::line_intersection::line_intersection(border, segment.data) {
                Some(geo::LineIntersection::SinglePoint { intersection, .. }) => {
                    cuts.push(param(intersection));
                }
                Some(geo::LineIntersection::Collinear { intersection }) => {
                    cuts.push(param(intersection.start));
                    cuts.push(param(intersection.end));
                }
                None => {}
            }
        }
        cuts.sort_by(f64::total_cmp);
        cuts.windows(2).any(|piece| {
            let (from, to) = (piece[0].max(0.0), piece[1].min(1.0));
            if to - from <= 1e-9 {
                return false;
            }
            SAMPLES.iter().any(|&t| {
                let t = from + (to - from) * t;
                let p = Coord {
                    x: c.x + (d.x - c.x) * t,
                    y: c.y + (d.y - c.y) * t,
                };
                rings.contains(p) && !segment_leaves(a, p) && !segment_leaves(b, p)
            })
        })
    };
    let mut adjacency_start = Vec::with_capacity(real + 1);
    let mut adjacency = Vec::with_capacity(real * 6);
    let mut cell_start = Vec::with_capacity(real + 1);
    let mut cell = Vec::with_capacity(real * 6);
    // Decided once per undirected edge, so adjacency is symmetric and costs half.
    let mut decided: Vec<Option<bool>> = vec![None; triangulation.num_undirected_edges()];
    for vertex in triangulation.vertices().take(real) {
        let from = vertex.fix().index();
        adjacency_start.push(adjacency.len() as u32);
        cell_start.push(cell.len() as u32);
        for edge in vertex.out_edges() {
            let to = edge.to().fix().index();
            let face = edge.face().fix().index() as u32;
            let right_face = edge.rev().face().fix().index();
            if to < real {
                cell.push((to as u32, face));
                let undirected = edge.fix().as_undirected().index();
                let adjacent = *decided[undirected].get_or_insert_with(|| {
                    shares_inner_border(
                        position[from],
                        position[to],
                        circumcenter[right_face],
                        circumcenter[face as usize],
                    )
                });
                if adjacent {
                    adjacency.push(to as u32);
                }
            } else {
                cell.push((NONE, face));
            }
        }
    }
    adjacency_start.push(adjacency.len() as u32);
    cell_start.push(cell.len() as u32);
    Ok(Sites {
        position,
        weight,
        item,
        hilbert,
        adjacency_start,
        adjacency,
        cell_start,
        cell,
        circumcenter,
    })
}

/// Which cells of a uniform raster over the community a boundary segment passes through
/// (conservatively: every cell of the segment's box): a fast "is the boundary anywhere near
/// this box?" for the many Delaunay edges far from it.
struct BoundaryRaster {
    origin: Coord<f64>,
    cell_inverse: f64,
    columns: usize,
    rows: usize,
    marked: Vec<bool>,
}

impl BoundaryRaster {
    fn new(boundary: &MultiPolygon<f64>) -> BoundaryRaster {
        let rect = boundary.bounding_rect().unwrap_or(Rect::new(
            Coord { x: 0.0, y: 0.0 },
            Coord { x: 1.0, y: 1.0 },
        ));
        let span = rect.width().max(rect.height()).max(1.0);
        let mut cell = (span / RASTER_SIDE_CELLS as f64).max(TERRITORY_SPACING_MIN_METRES);
        let side = |cell: f64| (span / cell).floor() as usize + 1;
        while side(cell) * side(cell) > RASTER_CELLS_MAX {
            cell *= 1.5;
        }
        let (columns, rows) = (
            (rect.width() / cell).floor() as usize + 1,
            (rect.height() / cell).floor() as usize + 1,
        );
        let mut raster = BoundaryRaster {
            origin: rect.min(),
            cell_inverse: 1.0 / cell,
            columns,
            rows,
            marked: vec![false; columns * rows],
        };
        for ring in boundary
            .iter()
            .flat_map(|p| std::iter::once(p.exterior()).chain(p.interiors()))
        {
            for line in ring.lines() {
                let (c0, r0, c1, r1) = raster.cells(
                    line.start.x.min(line.end.x),
                    line.start.y.min(line.end.y),
                    line.start.x.max(line.end.x),
                    line.start.y.max(line.end.y),
                );
                // Long segments: mark only the cells the segment passes near.
                for row in r0..=r1 {
                    for column in c0..=c1 {
                        if raster.cell_near_line(column, row, line) {
                            raster.marked[row * columns + column] = true;
                        }
                    }
                }
            }
        }
        raster
    }

    /// Column and row ranges covering a box (clamped to the raster).
    fn cells(
        &self,
        min_x: f64,
        min_y: f64,
        max_x: f64,
        max_y: f64,
    ) -> (usize, usize, usize, usize) {
        let column = |x: f64| {
            (((x - self.origin.x) * self.cell_inverse).max(0.0) as usize).min(self.columns - 1)
        };
        let row = |y: f64| {
            (((y - self.origin.y) * self.cell_inverse).max(0.0) as usize).min(self.rows - 1)
        };
        (column(min_x), row(min_y), column(max_x), row(max_y))
    }

    /// Does `line` come within one cell diagonal of this cell's centre? (Conservative.)
    fn cell_near_line(&self, column: usize, row: usize, line: Line<f64>) -> bool {
        let cell = 1.0 / self.cell_inverse;
        let centre = Coord {
            x: self.origin.x + (column as f64 + 0.5) * cell,
            y: self.origin.y + (row as f64 + 0.5) * cell,
        };
        let (dx, dy) = (line.end.x - line.start.x, line.end.y - line.start.y);
        let length2 = dx * dx + dy * dy;
        let t = if length2 > 0.0 {
            (((centre.x - line.start.x) * dx + (centre.y - line.start.y) * dy) / length2)
                .clamp(0.0, 1.0)
        } else {
            0.0
        };
        let nearest = Coord {
            x: line.start.x + dx * t,
            y: line.start.y + dy * t,
        };
        dist2(nearest, centre) <= cell * cell
    }

    /// Is any boundary segment possibly inside this envelope?
    fn any_marked(&self, envelope: &AABB<[f64; 2]>) -> bool {
        let (lower, upper) = (envelope.lower(), envelope.upper());
        let outside = upper[0] < self.origin.x
            || upper[1] < self.origin.y
            || lower[0] > self.origin.x + self.columns as f64 / self.cell_inverse
            || lower[1] > self.origin.y + self.rows as f64 / self.cell_inverse;
        if outside {
            return true;
        }
        let (c0, r0, c1, r1) = self.cells(lower[0], lower[1], upper[0], upper[1]);
        (r0..=r1).any(|row| (c0..=c1).any(|column| self.marked[row * self.columns + column]))
    }
}

/// The boundary's rings as flat vertex lists, for a fast even-odd inside test.
struct FlatRings {
    rings: Vec<Vec<Coord<f64>>>,
}

impl FlatRings {
    fn new(boundary: &MultiPolygon<f64>) -> FlatRings {
        FlatRings {
            rings: boundary
                .iter()
                .flat_map(|p| std::iter::once(p.exterior()).chain(p.interiors()))
                .map(|ring| ring.0.clone())
                .collect(),
        }
    }

    /// Even-odd over every ring (points exactly on the boundary may go either way).
    fn contains(&self, c: Coord<f64>) -> bool {
        let mut inside = false;
        for ring in &self.rings {
            for pair in ring.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                if (a.y > c.y) != (b.y > c.y) && c.x < (b.x - a.x) * (c.y - a.y) / (b.y - a.y) + a.x
                {
                    inside = !inside;
                }
            }
        }
        inside
    }
}

/// The part of segment c–d inside `rect` (Liang–Barsky), if any.
fn clip_to_rect(c: Coord<f64>, d: Coord<f64>, rect: Rect<f64>) -> Option<(Coord<f64>, Coord<f64>)> {
    let (dx, dy) = (d.x - c.x, d.y - c.y);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [
        (-dx, c.x - rect.min().x),
        (dx, rect.max().x - c.x),
        (-dy, c.y - rect.min().y),
        (dy, rect.max().y - c.y),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let r = q / p;
            if p < 0.0 {
                t0 = t0.max(r);
            } else {
                t1 = t1.min(r);
            }
        }
    }
    if t0 > t1 {
        return None;
    }
    let at = |t: f64| Coord {
        x: c.x + dx * t,
        y: c.y + dy * t,
    };
    Some((at(t0), at(t1)))
}

/// Which boundary moves `State::refine` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moves {
    /// Moves that lower the total out-of-range penalty.
    Penalty,
    /// Those, then moves that shrink the spread around centroids at equal penalty.
    Compact,
    /// Penalty moves that never push an in-range grid out of range (local repair: a change
    /// must not ripple past the neighbours of the grid it hits).
    KeepInRange,
}

/// Mutable assignment of sites to grids, with per-grid sums kept up to date.
#[derive(Clone)]
struct State {
    grid_of: Vec<u32>,
    households: Vec<u64>,
    sites: Vec<u32>,
    items: Vec<u32>,
    sum: Vec<Coord<f64>>,
    /// BFS scratch: generation stamps, avoids clearing.
    stamp: Vec<u32>,
    generation: u32,
    queue: Vec<u32>,
}

impl State {
    fn new(sites: usize) -> State {
        State {
            grid_of: vec![NONE; sites],
            households: Vec::new(),
            sites: Vec::new(),
            items: Vec::new(),
            sum: Vec::new(),
            stamp: vec![0; sites],
            generation: 0,
            queue: Vec::new(),
        }
    }

    fn new_grid(&mut self) -> u32 {
        self.households.push(0);
        self.sites.push(0);
        self.items.push(0);
        self.sum.push(Coord::default());
        (self.households.len() - 1) as u32
    }

    fn grids(&self) -> usize {
        self.households.len()
    }

    fn assign(&mut self, s: &Sites, site: usize, grid: u32) {
        let old = self.grid_of[site];
        let at = s.position[site];
        let weight = u64::from(s.weight[site]);
        let is_item = u32::from(s.item[site].is_some());
        if old != NONE {
            let o = old as usize;
            self.households[o] -= weight;
            self.sites[o] -= 1;
            self.items[o] -= is_item;
            self.sum[o].x -= at.x;
            self.sum[o].y -= at.y;
        }
        self.grid_of[site] = grid;
        if grid != NONE {
            let g = grid as usize;
            self.households[g] += weight;
            self.sites[g] += 1;
            self.items[g] += is_item;
            self.sum[g].x += at.x;
            self.sum[g].y += at.y;
        }
    }

    fn centroid(&self, grid: u32) -> Coord<f64> {
        let n = f64::from(self.sites[grid as usize].max(1));
        Coord {
            x: self.sum[grid as usize].x / n,
            y: self.sum[grid as usize].y / n,
        }
    }

    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamp.iter_mut().for_each(|v| *v = 0);
            self.generation = 1;
        }
        self.generation
    }

    /// Can `removed` leave `grid` without splitting it? It can when the rest stays connected,
    /// or when the only pieces cut off hold no households (territory sites, empty buildings
    /// behind it at the boundary): those are returned in `carry` to move along with it.
    fn removal_carry(
        &mut self,
        s: &Sites,
        grid: u32,
        removed: usize,
        carry: &mut Vec<u32>,
    ) -> bool {
        carry.clear();
        let targets: Vec<u32> = s
            .neighbours(removed)
            .iter()
            .copied()
            .filter(|&n| self.grid_of[n as usize] == grid)
            .collect();
        if targets.len() <= 1 {
            return true;
        }
        let generation = self.next_generation();
        self.stamp[removed] = generation;
        // Pieces as (start, end) ranges of `queue`, with their items and households.
        let mut pieces: Vec<(usize, usize, u32, u64)> = Vec::new();
        self.queue.clear();
        for &target in &targets {
            if self.stamp[target as usize] == generation {
                continue;
            }
            let start = self.queue.len();
            self.queue.push(target);
            self.stamp[target as usize] = generation;
            let mut head = start;
            let (mut items, mut households) = (0u32, 0u64);
            while head < self.queue.len() {
                let at = self.queue[head] as usize;
                head += 1;
                items += u32::from(s.item[at].is_some());
                households += u64::from(s.weight[at]);
                for &n in s.neighbours(at) {
                    let n = n as usize;
                    if self.stamp[n] != generation && self.grid_of[n] == grid {
                        self.stamp[n] = generation;
                        self.queue.push(n as u32);
                    }
                }
            }
            pieces.push((start, self.queue.len(), items, households));
            if pieces.len() == 1
                && targets
                    .iter()
                    .all(|&t| self.stamp[t as usize] == generation)
            {
                return true;
            }
        }
        if pieces.len() <= 1 {
            return true;
        }
        let main = (0..pieces.len())
            .max_by_key(|&i| (pieces[i].3, pieces[i].2, pieces[i].1 - pieces[i].0))
            .unwrap_or(0);
        for (i, &(start, end, _, households)) in pieces.iter().enumerate() {
            if i == main {
                continue;
            }
            if households > 0 || carry.len() + (end - start) > CARRY_SITES_MAX {
                carry.clear();
                return false;
            }
            carry.extend_from_slice(&self.queue[start..end]);
        }
        true
    }

    /// First cut: `region` sites in Hilbert order; indivisible items over the maximum get a
    /// grid each, the rest is cut into runs of equal households. Returns the new grid ids.
    fn cut(&mut self, s: &Sites, region: &[u32]) -> Vec<u32> {
        let mut order = region.to_vec();
        // Ties (sites in one Hilbert cell: buildings at one point are only millimetres
        // apart) broken by site index, not by the order the region came in.
        order.sort_by_key(|&site| (s.hilbert[site as usize], site));
        let mut created = Vec::new();
        let mut rest_households = 0u64;
        for &site in &order {
            let weight = s.weight[site as usize];
            if weight > HOUSEHOLDS_MAX {
                let grid = self.new_grid();
                created.push(grid);
                self.assign(s, site as usize, grid);
            } else {
                rest_households += u64::from(weight);
                self.assign(s, site as usize, NONE);
            }
        }
        let has_items = order.iter().any(|&site| s.item[site as usize].is_some());
        let k = if rest_households == 0 {
            usize::from(created.is_empty() && (has_items || !order.is_empty()))
        } else {
            grid_count_for(rest_households)
        };
        if k > 0 {
            let runs: Vec<u32> = (0..k).map(|_| self.new_grid()).collect();
            created.extend_from_slice(&runs);
            let per_run = rest_households.max(1) as f64 / k as f64;
            let mut cumulative = 0u64;
            for &site in &order {
                let weight = s.weight[site as usize];
                if weight > HOUSEHOLDS_MAX {
                    continue;
                }
                let middle = cumulative as f64 + f64::from(weight) / 2.0;
                let run = ((middle / per_run) as usize).min(k - 1);
                cumulative += u64::from(weight);
                self.assign(s, site as usize, runs[run]);
            }
        }
        created
    }

    /// Capacity-constrained Voronoi: sites go to the grid minimising d²(site, centre) − bias,
    /// centres move to their sites' centroid and biases rise for light grids and fall for heavy
    /// ones. The cells of such a power diagram are convex, so grids come out compact; the
    /// Hilbert cut only seeds the centres. Items over the maximum keep their own grid.
    fn balance_power_diagram(&mut self, s: &Sites, region: &[u32], grids: &[u32]) {
        let movable: Vec<u32> = region
            .iter()
            .copied()
            .filter(|&site| s.weight[site as usize] <= HOUSEHOLDS_MAX)
            .collect();
        let runs: Vec<u32> = grids
            .iter()
            .copied()
            .filter(|&g| {
                !movable.is_empty() && movable.iter().any(|&site| self.grid_of[site as usize] == g)
            })
            .collect();
        if runs.len() < 2 {
            return;
        }
        let households: u64 = movable
            .iter()
            .map(|&site| u64::from(s.weight[site as usize]))
            .sum();
        let target = households as f64 / runs.len() as f64;
        let mut centre: Vec<Coord<f64>> = runs.iter().map(|&g| self.centroid(g)).collect();
        let (mut min, mut max) = (
            Coord {
                x: f64::MAX,
                y: f64::MAX,
            },
            Coord {
                x: f64::MIN,
                y: f64::MIN,
            },
        );
        for &site in &movable {
            let c = s.position[site as usize];
            min = Coord {
                x: min.x.min(c.x),
                y: min.y.min(c.y),
            };
            max = Coord {
                x: max.x.max(c.x),
                y: max.y.max(c.y),
            };
        }
        let radius2 = ((max.x - min.x) * (max.y - min.y)).max(1.0) / runs.len() as f64;
        let mut bias = vec![0.0f64; runs.len()];
        // Each site starts in the run the Hilbert cut gave it.
        let mut run_of_grid: HashMap<u32, usize> = HashMap::with_capacity(runs.len());
        for (index, &g) in runs.iter().enumerate() {
            run_of_grid.insert(g, index);
        }
        let mut choice: Vec<usize> = movable
            .iter()
            .map(|&site| {
                run_of_grid
                    .get(&self.grid_of[site as usize])
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        // A site's best centre is almost always its current centre or one of that centre's
        // nearest centres, so each site only weighs the centres near its current one
        // (power cells are convex and move little between rounds).
        let candidates = POWER_CANDIDATES.min(runs.len());
        let mut near_centres: Vec<u32> = vec![0; runs.len() * candidates];
        let mut nearest: Vec<(f64, u32)> = Vec::with_capacity(candidates + 1);
        let mut weight = vec![0u64; runs.len()];
        let mut sum = vec![Coord { x: 0.0, y: 0.0 }; runs.len()];
        let mut count = vec![0usize; runs.len()];
        for iteration in 0..POWER_ITERATIONS {
            if iteration % POWER_REFRESH_ROUNDS == 0 {
                for (g, &c) in centre.iter().enumerate() {
                    // The `candidates` nearest centres, kept sorted by insertion: most
                    // centres are farther than the current last and cost one comparison.
                    nearest.clear();
                    for (h, &other) in centre.iter().enumerate() {
                        let key = (dist2(c, other), h as u32);
                        if nearest.len() == candidates {
                            let last = nearest[candidates - 1];
                            if key.0.total_cmp(&last.0).then(key.1.cmp(&last.1)).is_ge() {
                                continue;
                            }
                            nearest.pop();
                        }
                        let at = nearest.partition_point(|probe: &(f64, u32)| {
                            probe.0.total_cmp(&key.0).then(probe.1.cmp(&key.1)).is_lt()
                        });
                        nearest.insert(at, key);
                    }
                    for (slot, &(_, h)) in nearest.iter().enumerate() {
                        near_centres[g * candidates + slot] = h;
                    }
                }
            }
            weight.iter_mut().for_each(|w| *w = 0);
            sum.iter_mut().for_each(|c| *c = Coord { x: 0.0, y: 0.0 });
            count.iter_mut().for_each(|n| *n = 0);
            for (i, &site) in movable.iter().enumerate() {
                let at = s.position[site as usize];
                let current = choice[i];
                let mut best = current;
                let mut best_cost = dist2(at, centre[current]) - bias[current];
                for &g in &near_centres[current * candidates..(current + 1) * candidates] {
                    let g = g as usize;
                    let cost = dist2(at, centre[g]) - bias[g];
                    if cost < best_cost || (cost == best_cost && g < best) {
                        best = g;
                        best_cost = cost;
                    }
                }
                choice[i] = best;
                weight[best] += u64::from(s.weight[site as usize]);
                sum[best].x += at.x;
                sum[best].y += at.y;
                count[best] += 1;
            }
            let step = POWER_STEP * (1.0 - iteration as f64 / POWER_ITERATIONS as f64 * 0.5);
            for g in 0..runs.len() {
                if count[g] > 0 {
                    centre[g] = Coord {
                        x: sum[g].x / count[g] as f64,
                        y: sum[g].y / count[g] as f64,
                    };
                }
                bias[g] += step * (target - weight[g] as f64) / target * radius2;
            }
        }
        for (i, &site) in movable.iter().enumerate() {
            self.assign(s, site as usize, runs[choice[i]]);
        }
    }

    /// Every grid in `grids` keeps its heaviest connected piece; the rest is unassigned.
    fn keep_heaviest_components(&mut self, s: &Sites, grids: &[u32], members: &[Vec<u32>]) {
        for (&grid, sites) in grids.iter().zip(members) {
            let generation = self.next_generation();
            let mut components: Vec<(u64, usize, Vec<u32>)> = Vec::new();
            for &start in sites {
                if self.stamp[start as usize] == generation || self.grid_of[start as usize] != grid
                {
                    continue;
                }
                self.stamp[start as usize] = generation;
                let mut component = vec![start];
                let mut head = 0;
                let mut households = 0u64;
                while head < component.len() {
                    let at = component[head] as usize;
                    head += 1;
                    households += u64::from(s.weight[at]);
                    for &n in s.neighbours(at) {
                        if self.stamp[n as usize] != generation && self.grid_of[n as usize] == grid
                        {
                            self.stamp[n as usize] = generation;
                            component.push(n);
                        }
                    }
                }
                let items = component
                    .iter()
                    .filter(|&&c| s.item[c as usize].is_some())
                    .count();
                components.push((households, items * 1_000_000 + component.len(), component));
            }
            if components.len() <= 1 {
                continue;
            }
            let best = (0..components.len())
                .max_by_key(|&i| (components[i].0, components[i].1, std::cmp::Reverse(i)))
                .unwrap_or(0);
            for (i, (_, _, component)) in components.iter().enumerate() {
                if i != best {
                    for &site in component {
                        self.assign(s, site as usize, NONE);
                    }
                }
            }
        }
    }

    /// Unassigned sites in `region` join an adjacent grid (the lightest one), growing outwards;
    /// pieces with no assigned neighbour at all become new grids.
    fn grow(&mut self, s: &Sites, region: &[u32], allowed: &dyn Fn(u32) -> bool) -> Vec<u32> {
        let mut created = Vec::new();
        loop {
            let mut progress = true;
            while progress {
                progress = false;
                for &site in region {
                    let site = site as usize;
                    if self.grid_of[site] != NONE {
                        continue;
                    }
                    let best = s
                        .neighbours(site)
                        .iter()
                        .map(|&n| self.grid_of[n as usize])
                        .filter(|&g| g != NONE && allowed(g))
                        .min_by_key(|&g| (self.households[g as usize], g));
                    if let Some(grid) = best {
                        self.assign(s, site, grid);
                        progress = true;
                    }
                }
            }
            // Territory cut off from the graph (a sliver between notches) joins any grid whose
            // cell touches it; its geometry is reattached to a touching grid at the end.
            let mut joined = false;
            for &site in region {
                let site = site as usize;
                if self.grid_of[site] != NONE || s.item[site].is_some() {
                    continue;
                }
                if let Some(grid) = s
                    .cell(site)
                    .iter()
                    .filter(|(n, _)| *n != NONE)
                    .map(|&(n, _)| self.grid_of[n as usize])
                    .find(|&g| g != NONE && allowed(g))
                {
                    self.assign(s, site, grid);
                    joined = true;
                }
            }
            if joined {
                continue;
            }
            let Some(&orphan) = region
                .iter()
                .find(|&&site| self.grid_of[site as usize] == NONE)
            else {
                return created;
            };
            let grid = self.new_grid();
            created.push(grid);
            self.assign(s, orphan as usize, grid);
        }
    }

    /// Boundary moves between active grids: first anything that lowers the out-of-range
    /// penalty, then (when `compact`) Hartigan moves that shrink the spread around centroids
    /// without changing the penalty. Grids never disconnect and never lose their last item.
    fn refine(
        &mut self,
        s: &Sites,
        region: &[u32],
        active: &dyn Fn(u32) -> bool,
        moves: Moves,
        passes: usize,
    ) {
        let compact = moves == Moves::Compact;
        let keep_in_range = moves == Moves::KeepInRange;
        let mut order = region.to_vec();
        // Ties (sites in one Hilbert cell: buildings at one point are only millimetres
        // apart) broken by site index, not by the order the region came in.
        order.sort_by_key(|&site| (s.hilbert[site as usize], site));
        let mut carry = Vec::new();
        for _ in 0..passes {
            let mut moved = 0usize;
            for &site in &order {
                let site = site as usize;
                let from = self.grid_of[site];
                if from == NONE || !active(from) || self.sites[from as usize] <= 1 {
                    continue;
                }
                let is_item = s.item[site].is_some();
                if is_item && self.items[from as usize] <= 1 {
                    continue;
                }
                let weight = u64::from(s.weight[site]);
                let at = s.position[site];
                let from_households = self.households[from as usize];
                let from_n = f64::from(self.sites[from as usize]);
                let from_c = self.centroid(from);
                let from_spread = dist2(at, from_c) * from_n / (from_n - 1.0);
                let mut best: Option<(u64, f64, u32)> = None;
                for &n in s.neighbours(site) {
                    let to = self.grid_of[n as usize];
                    if to == NONE || to == from || !active(to) {
                        continue;
                    }
                    let to_households = self.households[to as usize];
                    let before = penalty(from_households) + penalty(to_households);
                    let after = penalty(from_households - weight) + penalty(to_households + weight);
                    if keep_in_range
                        && ((penalty(from_households) == 0
                            && penalty(from_households - weight) > 0)
                            || (penalty(to_households) == 0 && penalty(to_households + weight) > 0))
                    {
                        continue;
                    }
                    let to_n = f64::from(self.sites[to as usize]);
                    let spread_gain =
                        from_spread - dist2(at, self.centroid(to)) * to_n / (to_n + 1.0);
                    let accept = after < before
                        || (compact
                            && after == before
                            && (weight == 0 || after == 0)
                            && spread_gain > 1e-9 * from_spread.max(1.0));
                    if !accept {
                        continue;
                    }
                    let key = (before - after, spread_gain, to);
                    let better = match best {
                        None => true,
                        Some((g, sg, _)) => key.0 > g || (key.0 == g && key.1 > sg),
                    };
                    if better {
                        best = Some(key);
                    }
                }
                if let Some((_, _, to)) = best
                    && self.removal_carry(s, from, site, &mut carry)
                {
                    let carried_items = carry
                        .iter()
                        .filter(|&&c| s.item[c as usize].is_some())
                        .count() as u32;
                    if is_item && self.items[from as usize] <= 1 + carried_items {
                        continue;
                    }
                    if self.sites[from as usize] <= 1 + carry.len() as u32 {
                        continue;
                    }
                    self.assign(s, site, to);
                    for &c in &carry {
                        self.assign(s, c as usize, to);
                    }
                    moved += 1;
                }
            }
            if moved == 0 {
                break;
            }
        }
    }

    fn members(&self, grids: usize) -> Vec<Vec<u32>> {
        let mut members = vec![Vec::new(); grids];
        for (site, &grid) in self.grid_of.iter().enumerate() {
            if grid != NONE {
                members[grid as usize].push(site as u32);
            }
        }
        members
    }
}

fn dist2(a: Coord<f64>, b: Coord<f64>) -> f64 {
    (a.x - b.x).powi(2) + (a.y - b.y).powi(2)
}

/// Split a community into grids from scratch.
pub fn partition(input: &CommunityInput) -> Result<Partition, PartitionError> {
    let community = Community::build(input)?;
    let s = &community.sites;
    let mut state = State::new(s.len());
    let all: Vec<u32> = (0..s.len() as u32).collect();
    solve_region(&mut state, s, &all);
    // Grids the refinement left out of range get the local repair `repartition` uses.
    let mut codes = HashMap::new();
    repair_out_of_range(&mut state, s, &mut codes);
    finish(&community, state, &codes, 0)
}

/// Cut `region` (all unassigned afterwards) into fresh grids and refine them among themselves.
/// Two first cuts compete: the Hilbert runs refined by compactness moves, and a balanced power
/// diagram seeded by those runs. The one with the lower out-of-range penalty wins, then the
/// one with fewer adjacency edges cut between grids (shorter borders, more compact grids).
fn solve_region(state: &mut State, s: &Sites, region: &[u32]) -> Vec<u32> {
    let mut hilbert = state.clone();
    let mut power = state.clone();
    let created_hilbert = solve_variant(&mut hilbert, s, region, false);
    let created_power = solve_variant(&mut power, s, region, true);
    let score = |st: &State, created: &[u32]| {
        let penalty_sum: u64 = created
            .iter()
            .map(|&g| penalty(st.households[g as usize]))
            .sum();
        let mut cut = 0usize;
        for &site in region {
            let g = st.grid_of[site as usize];
            cut += s
                .neighbours(site as usize)
                .iter()
                .filter(|&&n| st.grid_of[n as usize] != g)
                .count();
        }
        (penalty_sum, cut)
    };
    if score(&power, &created_power) < score(&hilbert, &created_hilbert) {
        *state = power;
        created_power
    } else {
        *state = hilbert;
        created_hilbert
    }
}

fn solve_variant(state: &mut State, s: &Sites, region: &[u32], power: bool) -> Vec<u32> {
    let mut created = state.cut(s, region);
    if power {
        state.balance_power_diagram(s, region, &created);
    }
    let members = state.members(state.grids());
    let created_members: Vec<Vec<u32>> = created
        .iter()
        .map(|&g| members[g as usize].clone())
        .collect();
    state.keep_heaviest_components(s, &created, &created_members);
    let first = created.first().copied().unwrap_or(state.grids() as u32);
    let extra = state.grow(s, region, &|g| g >= first);
    created.extend(extra);
    let moves = if power {
        Moves::Penalty
    } else {
        Moves::Compact
    };
    state.refine(s, region, &|g| g >= first, moves, REFINE_PASSES_MAX);
    created
}

/// Re-partition after buildings were added or removed: every building keeps its previous grid
/// where it can; new buildings join the grid they fall into; only grids that end out of range
/// or broken are balanced with their neighbours, and split or merged (and re-cut locally) when
/// balancing is not enough. Codes of untouched grids never change; new grids get new codes.
pub fn repartition(input: &CommunityInput, previous: &[Grid]) -> Result<Partition, PartitionError> {
    let community = Community::build(input)?;
    let s = &community.sites;
    let mut state = State::new(s.len());
    let mut previous_grid_of: HashMap<&str, u32> = HashMap::new();
    let mut codes: HashMap<u32, String> = HashMap::new();
    let mut sequence_max = 0u32;
    for grid in previous {
        let id = state.new_grid();
        codes.insert(id, grid.grid_code.clone());
        sequence_max = sequence_max.max(sequence_of(&grid.grid_code));
        for member in &grid.members {
            previous_grid_of.insert(member.as_str(), id);
        }
    }
    // Sites without a previous grid — territory sites (no member key) and new buildings — go
    // to the previous grid whose land holds them (the nearest polygon: territory sites sit on
    // its edge). Regrowing them instead would reshuffle grids along the whole boundary, and a
    // new building belongs to the grid it stands in.
    let previous_boxes: RTree<GeomWithData<Rectangle<[f64; 2]>, u32>> = RTree::bulk_load(
        previous
            .iter()
            .enumerate()
            .filter_map(|(id, grid)| {
                let rect = grid.polygon.bounding_rect()?;
                Some(GeomWithData::new(
                    Rectangle::from_corners(
                        [rect.min().x, rect.min().y],
                        [rect.max().x, rect.max().y],
                    ),
                    id as u32,
                ))
            })
            .collect(),
    );
    for site in 0..s.len() {
        let known = s.item[site]
            .and_then(|item| previous_grid_of.get(community.member_key(item).as_str()))
            .copied();
        if let Some(grid) = known {
            state.assign(s, site, grid);
            continue;
        }
        let at = community.projection.inverse(s.position[site]);
        let probe = AABB::from_corners(
            [
                at.x - TERRITORY_PROBE_DEGREES,
                at.y - TERRITORY_PROBE_DEGREES,
            ],
            [
                at.x + TERRITORY_PROBE_DEGREES,
                at.y + TERRITORY_PROBE_DEGREES,
            ],
        );
        let nearest = previous_boxes
            .locate_in_envelope_intersecting(&probe)
            .map(|candidate| {
                let polygon = &previous[candidate.data as usize].polygon;
                (Euclidean.distance(&geo::Point(at), polygon), candidate.data)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        if let Some((_, grid)) = nearest {
            state.assign(s, site, grid);
        }
    }
    let all: Vec<u32> = (0..s.len() as u32).collect();
    let members = state.members(state.grids());
    let grids: Vec<u32> = (0..state.grids() as u32).collect();
    state.keep_heaviest_components(s, &grids, &members);
    state.grow(s, &all, &|_| true);
    repair_out_of_range(&mut state, s, &mut codes);
    finish(&community, state, &codes, sequence_max)
}

/// Grids out of range (and not locked by an oversize item) are balanced with their
/// neighbours by moves that never push an in-range grid out of range, else re-cut alone, with
/// their lightest neighbour, or with all their neighbours, whichever lowers the penalty most.
/// Only a bad grid and its neighbours change; `codes` follow the new grids that keep most of
/// an old grid's members.
fn repair_out_of_range(state: &mut State, s: &Sites, codes: &mut HashMap<u32, String>) {
    let mut retired: HashSet<u32> = HashSet::new();
    let mut pass = 0;
    loop {
        pass += 1;
        let bad: Vec<u32> = (0..state.grids() as u32)
            .filter(|&g| !retired.contains(&g) && state.sites[g as usize] > 0)
            .filter(|&g| penalty(state.households[g as usize]) > 0 && !locked(state, s, g))
            .collect();
        if bad.is_empty() || pass > 8 {
            break;
        }
        let members = state.members(state.grids());
        let adjacency = grid_adjacency(state, s);
        for grid in bad {
            if penalty(state.households[grid as usize]) == 0 || retired.contains(&grid) {
                continue;
            }
            // Ordered, so that the region (and every move made in it) does not depend on a
            // hash seed: the same input gives the same grids in every process.
            let neighbourhood: std::collections::BTreeSet<u32> = adjacency
                .get(&grid)
                .into_iter()
                .flatten()
                .copied()
                .chain(std::iter::once(grid))
                .filter(|g| !retired.contains(g))
                .collect();
            let region: Vec<u32> = neighbourhood
                .iter()
                .flat_map(|&g| members[g as usize].iter().copied())
                .filter(|&site| neighbourhood.contains(&state.grid_of[site as usize]))
                .collect();
            state.refine(
                s,
                &region,
                &|g| neighbourhood.contains(&g),
                Moves::KeepInRange,
                LOCAL_PASSES_MAX,
            );
            let households = state.households[grid as usize];
            if penalty(households) == 0 {
                continue;
            }
            // Balancing was not enough: re-cut this grid alone (too big) or merged with its
            // lightest neighbour (too small); if that still leaves a grid out of range,
            // re-cut it with all its neighbours. Either way only this grid and its
            // neighbours change, and only when the re-cut lowers their penalty.
            let unlocked: Vec<u32> = adjacency
                .get(&grid)
                .into_iter()
                .flatten()
                .copied()
                .filter(|&g| !retired.contains(&g) && !locked(state, s, g))
                .collect();
            let mut first = vec![grid];
            if households < u64::from(HOUSEHOLDS_MIN)
                && let Some(&partner) = unlocked
                    .iter()
                    .min_by_key(|&&g| (state.households[g as usize], g))
            {
                first.push(partner);
            }
            let mut all = vec![grid];
            all.extend_from_slice(&unlocked);
            let mut best: Option<(u64, State, Vec<u32>, Vec<u32>)> = None;
            for merged in [first, all] {
                let total: u64 = merged.iter().map(|&g| state.households[g as usize]).sum();
                if merged.len() == 1 && grid_count_for(total) <= 1 {
                    continue;
                }
                if best.as_ref().is_some_and(|b| b.0 == 0) {
                    break;
                }
                let penalty_before: u64 = merged
                    .iter()
                    .map(|&g| penalty(state.households[g as usize]))
                    .sum();
                let mut trial = state.clone();
                let region: Vec<u32> = (0..s.len() as u32)
                    .filter(|&site| merged.contains(&trial.grid_of[site as usize]))
                    .collect();
                for &site in &region {
                    trial.assign(s, site as usize, NONE);
                }
                let created = solve_region(&mut trial, s, &region);
                let penalty_after: u64 = created
                    .iter()
                    .map(|&g| penalty(trial.households[g as usize]))
                    .sum();
                if penalty_after < penalty_before
                    && best.as_ref().is_none_or(|b| penalty_after < b.0)
                {
                    best = Some((penalty_after, trial, created, merged));
                }
            }
            let Some((_, trial, created, merged)) = best else {
                continue;
            };
            let region: Vec<u32> = (0..s.len() as u32)
                .filter(|&site| merged.contains(&state.grid_of[site as usize]))
                .collect();
            let before: Vec<u32> = region
                .iter()
                .map(|&site| state.grid_of[site as usize])
                .collect();
            *state = trial;
            for &g in &merged {
                retired.insert(g);
            }
            // Old codes go to the new grids that keep most of their members.
            let mut overlap: HashMap<(u32, u32), usize> = HashMap::new();
            for (i, &site) in region.iter().enumerate() {
                *overlap
                    .entry((before[i], state.grid_of[site as usize]))
                    .or_default() += 1;
            }
            let mut pairs: Vec<((u32, u32), usize)> = overlap.into_iter().collect();
            pairs.sort_by_key(|&((old, new), n)| (std::cmp::Reverse(n), old, new));
            let mut used_old = HashSet::new();
            let mut used_new = HashSet::new();
            for ((old, new), _) in pairs {
                if used_old.contains(&old) || used_new.contains(&new) || !created.contains(&new) {
                    continue;
                }
                if let Some(code) = codes.remove(&old) {
                    codes.insert(new, code);
                    used_old.insert(old);
                    used_new.insert(new);
                }
            }
            break;
        }
    }
}

/// A grid whose only problem is an indivisible item or a community too small: nothing to fix.
fn locked(state: &State, s: &Sites, grid: u32) -> bool {
    let households = state.households[grid as usize];
    if households > u64::from(HOUSEHOLDS_MAX) {
        return state
            .grid_of
            .iter()
            .enumerate()
            .any(|(site, &g)| g == grid && s.weight[site] > HOUSEHOLDS_MAX);
    }
    false
}

fn sequence_of(code: &str) -> u32 {
    code.get(12..)
        .and_then(|tail| tail.parse().ok())
        .unwrap_or(0)
}

fn grid_adjacency(state: &State, s: &Sites) -> HashMap<u32, Vec<u32>> {
    let mut pairs: HashSet<(u32, u32)> = HashSet::new();
    for site in 0..s.len() {
        let a = state.grid_of[site];
        for &n in s.neighbours(site) {
            let b = state.grid_of[n as usize];
            if a != b && a != NONE && b != NONE {
                pairs.insert((a, b));
            }
        }
    }
    let mut adjacency: HashMap<u32, Vec<u32>> = HashMap::new();
    for (a, b) in pairs {
        adjacency.entry(a).or_default().push(b);
    }
    for list in adjacency.values_mut() {
        list.sort_unstable();
    }
    adjacency
}

/// Geometry, flags and codes for the final assignment.
fn finish(
    community: &Community<'_>,
    state: State,
    codes: &HashMap<u32, String>,
    sequence_max: u32,
) -> Result<Partition, PartitionError> {
    let s = &community.sites;
    let members = state.members(state.grids());
    let live: Vec<u32> = (0..state.grids() as u32)
        .filter(|&g| !members[g as usize].is_empty())
        .collect();
    if live.len() > GRIDS_PER_COMMUNITY_MAX {
        return Err(PartitionError::TooManyGrids {
            community: community.input.id.clone(),
            grids: live.len(),
            max: GRIDS_PER_COMMUNITY_MAX,
        });
    }
    let total: u64 = s.weight.iter().map(|&w| u64::from(w)).sum();
    let oversize_total: u64 = s
        .weight
        .iter()
        .filter(|&&w| w > HOUSEHOLDS_MAX)
        .map(|&w| u64::from(w))
        .sum();
    let rest = total - oversize_total;
    let rest_k = grid_count_for(rest) as u64;
    let indivisible = rest > 0
        && rest >= u64::from(HOUSEHOLDS_MIN)
        && penalty(rest / rest_k) + penalty(rest.div_ceil(rest_k)) > 0;
    let no_items = s.item.iter().all(|i| i.is_none());

    let mut next_face = vec![NONE; s.circumcenter.len()];
    let mut built = Vec::with_capacity(live.len());
    for &grid in &live {
        let sites = &members[grid as usize];
        let raw = trace_region(s, &state.grid_of, grid, sites, &mut next_face);
        let needs_clip = sites.iter().any(|&site| s.item[site as usize].is_none())
            || raw
                .bounding_rect()
                .is_none_or(|rect| touches_boundary(community, rect));
        let clipped = if needs_clip {
            raw.intersection(&community.boundary)
        } else {
            raw
        };
        let mut parts: Vec<Polygon<f64>> = clipped.0;
        // Main part: the one holding most of the grid's items, then the largest.
        let score = |part: &Polygon<f64>| {
            let items = sites
                .iter()
                .filter(|&&site| {
                    s.item[site as usize].is_some() && part.intersects(&s.position[site as usize])
                })
                .count();
            (items, geo::Area::unsigned_area(part))
        };
        let mut scored: Vec<(usize, f64, Polygon<f64>)> = parts
            .drain(..)
            .map(|part| {
                let (items, area) = score(&part);
                (items, area, part)
            })
            .filter(|(_, area, _)| *area > 1e-6)
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)));
        let mut parts = scored.into_iter().map(|(_, _, p)| p);
        let main = parts
            .next()
            .unwrap_or_else(|| Polygon::new(LineString::new(vec![]), vec![]));
        let detached: Vec<Polygon<f64>> = parts.collect();
        let centroid = state.centroid(grid);
        built.push((grid, main, detached, centroid));
    }

    // Detached pieces holding none of their grid's items (a cell reaching across a notch)
    // join a neighbouring grid they touch, so coverage stays whole and grids stay connected.
    reattach_orphans(s, &members, &mut built);

    // Codes: kept codes stay; the others are numbered in reading order after the kept ones.
    let row_height = (community.area / live.len().max(1) as f64).sqrt().max(1.0);
    let top = community
        .boundary
        .bounding_rect()
        .map(|r| r.max().y)
        .unwrap_or(0.0);
    let reading_key: Vec<(i64, f64)> = built
        .iter()
        .map(|(_, main, _, fallback)| {
            let c = geo::Centroid::centroid(main)
                .map(|p| p.0)
                .unwrap_or(*fallback);
            (((top - c.y) / row_height).floor() as i64, c.x)
        })
        .collect();
    let mut order: Vec<usize> = (0..built.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, xa) = reading_key[a];
        let (rb, xb) = reading_key[b];
        ra.cmp(&rb).then(xa.total_cmp(&xb))
    });
    let mut next_sequence = sequence_max;
    let mut grids = Vec::with_capacity(built.len());
    for &i in &order {
        let (grid, main, detached, _) = &built[i];
        let grid_code = match codes.get(grid) {
            Some(code) => code.clone(),
            None => {
                next_sequence += 1;
                format!("{}{:03}", community.input.code, next_sequence.min(999))
            }
        };
        let sites = &members[*grid as usize];
        let mut member_keys: Vec<String> = Vec::new();
        let mut population = 0u32;
        let mut oversize = false;
        for &site in sites {
            if let Some(item) = s.item[site as usize] {
                member_keys.push(community.member_key(item));
                population = population.saturating_add(item.population);
                oversize |= s.weight[site as usize] > HOUSEHOLDS_MAX;
            }
        }
        member_keys.sort();
        let households = state.households[*grid as usize] as u32;
        let mut flags = Vec::new();
        if no_items {
            flags.push(Flag::NoBuildings);
        } else if total < u64::from(HOUSEHOLDS_MIN) {
            flags.push(Flag::SmallCommunity);
        }
        if oversize {
            flags.push(Flag::OversizeBuilding);
        }
        if penalty(u64::from(households)) > 0 && flags.is_empty() {
            flags.push(if indivisible {
                Flag::IndivisibleTotal
            } else {
                Flag::OutOfRange
            });
        }
        if !detached.is_empty() {
            flags.push(Flag::Disconnected);
        }
        let pp = polsby_popper(main);
        grids.push(Grid {
            grid_code,
            community_id: community.input.id.clone(),
            households,
            population,
            members: member_keys,
            flags,
            polygon: community.projection.inverse_polygon(main),
            detached: detached
                .iter()
                .map(|p| community.projection.inverse_polygon(p))
                .collect(),
            polsby_popper: pp,
        });
    }
    grids.sort_by(|a, b| a.grid_code.cmp(&b.grid_code));
    let buildings = community.input.buildings.len();
    let quality = Quality::of(&grids, buildings);
    Ok(Partition {
        community_id: community.input.id.clone(),
        grids,
        quality,
    })
}

fn touches_boundary(community: &Community<'_>, rect: Rect<f64>) -> bool {
    let envelope = AABB::from_corners([rect.min().x, rect.min().y], [rect.max().x, rect.max().y]);
    community
        .boundary_segments
        .locate_in_envelope_intersecting(&envelope)
        .next()
        .is_some()
}

/// The union of a grid's Voronoi cells, traced from the triangulation: the cell edge dual to
/// the Delaunay edge (v, u) is on the grid's border when u is in another grid. Shared borders
/// come from the same circumcentres, so neighbouring grids match exactly.
fn trace_region(
    s: &Sites,
    grid_of: &[u32],
    grid: u32,
    sites: &[u32],
    next_face: &mut [u32],
) -> MultiPolygon<f64> {
    let mut starts = Vec::new();
    for &site in sites {
        let cell = s.cell(site as usize);
        let count = cell.len();
        for k in 0..count {
            let (neighbour, face) = cell[k];
            let inside = neighbour != NONE && grid_of[neighbour as usize] == grid;
            if inside {
                continue;
            }
            let previous_face = cell[(k + count - 1) % count].1;
            next_face[previous_face as usize] = face;
            starts.push(previous_face);
        }
    }
    let mut outers: Vec<Vec<Coord<f64>>> = Vec::new();
    let mut holes: Vec<Vec<Coord<f64>>> = Vec::new();
    for &start in &starts {
        if next_face[start as usize] == NONE {
            continue;
        }
        let mut ring = Vec::new();
        let mut at = start;
        let mut guard = 0usize;
        while next_face[at as usize] != NONE && guard <= starts.len() {
            ring.push(s.circumcenter[at as usize]);
            let next = next_face[at as usize];
            next_face[at as usize] = NONE;
            at = next;
            guard += 1;
        }
        if ring.len() < 3 {
            continue;
        }
        ring.push(ring[0]);
        if signed_area(&ring) > 0.0 {
            outers.push(ring);
        } else {
            holes.push(ring);
        }
    }
    for &start in &starts {
        next_face[start as usize] = NONE;
    }
    let mut polygons: Vec<(Polygon<f64>, Vec<LineString<f64>>)> = outers
        .into_iter()
        .map(|ring| (Polygon::new(LineString::new(ring), vec![]), Vec::new()))
        .collect();
    for hole in holes {
        let probe = hole[0];
        let target = if polygons.len() == 1 {
            Some(0)
        } else {
            polygons.iter().position(|(p, _)| p.intersects(&probe))
        };
        if let Some(index) = target {
            polygons[index].1.push(LineString::new(hole));
        }
    }
    MultiPolygon::new(
        polygons
            .into_iter()
            .map(|(outer, holes)| Polygon::new(outer.exterior().clone(), holes))
            .collect(),
    )
}

type Built = (u32, Polygon<f64>, Vec<Polygon<f64>>, Coord<f64>);

fn reattach_orphans(s: &Sites, members: &[Vec<u32>], built: &mut [Built]) {
    let mut orphans: Vec<Polygon<f64>> = Vec::new();
    for (grid, _, detached, _) in built.iter_mut() {
        let items: Vec<Coord<f64>> = members[*grid as usize]
            .iter()
            .filter(|&&site| s.item[site as usize].is_some())
            .map(|&site| s.position[site as usize])
            .collect();
        let (keep, free): (Vec<_>, Vec<_>) = detached
            .drain(..)
            .partition(|part| items.iter().any(|c| part.intersects(c)));
        *detached = keep;
        orphans.extend(free);
    }
    for orphan in orphans {
        let Some(rect) = orphan.bounding_rect() else {
            continue;
        };
        let mut joined = false;
        for (_, main, _, _) in built.iter_mut() {
            let Some(other) = main.bounding_rect() else {
                continue;
            };
            if !rect.intersects(&other) {
                continue;
            }
            let union = main.union(&orphan);
            if union.0.len() == 1 {
                *main = union.0.into_iter().next().unwrap_or_else(|| main.clone());
                joined = true;
                break;
            }
        }
        if !joined && let Some((_, _, detached, _)) = built.first_mut() {
            detached.push(orphan);
        }
    }
}
