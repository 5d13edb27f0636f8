//! Point-in-grid lookup: which grid serves (lon, lat)?
//!
//! Why an R-tree over bounding boxes plus an exact point-in-polygon test: grids are small and
//! do not overlap, so a point's box query returns one or two candidates and the exact test on
//! a few dozen edges settles it. The index is built in one bulk load from a plain list, so the
//! registry can rebuild it from its grid events at start (or after every change) cheaply.

use geo::{BoundingRect, Coord, LineString, Polygon};
use rstar::RTree;
use rstar::primitives::{GeomWithData, Rectangle};

/// Bound on the grids one index holds (a city of 50,000 grids fits with room to spare).
pub const GRIDS_MAX: usize = 2_000_000;

/// The answer to a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Located<'a> {
    Grid {
        grid_code: &'a str,
        community_id: &'a str,
    },
    /// No grid covers the point: outside every community (or on no grid's land).
    Unserved,
}

/// Why an index could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LocateError {
    #[error("grid {grid_code}: polygon is empty or has non-finite coordinates")]
    BadPolygon { grid_code: String },
    #[error("{grids} grids, more than {max}")]
    TooManyGrids { grids: usize, max: usize },
}

#[derive(Debug)]
struct Entry {
    grid_code: String,
    community_id: String,
    polygon: Polygon<f64>,
}

/// An immutable R-tree of grid polygons (WGS84 lon/lat).
#[derive(Debug)]
pub struct LocateIndex {
    entries: Vec<Entry>,
    tree: RTree<GeomWithData<Rectangle<[f64; 2]>, u32>>,
}

impl LocateIndex {
    /// Build from (grid_code, community_id, polygon) triples.
    pub fn build(
        grids: impl IntoIterator<Item = (String, String, Polygon<f64>)>,
    ) -> Result<LocateIndex, LocateError> {
        let mut entries = Vec::new();
        let mut boxes = Vec::new();
        for (grid_code, community_id, polygon) in grids {
            if entries.len() >= GRIDS_MAX {
                return Err(LocateError::TooManyGrids {
                    grids: entries.len() + 1,
                    max: GRIDS_MAX,
                });
            }
            let Some(rect) = polygon.bounding_rect().filter(|r| {
                r.min().x.is_finite()
                    && r.min().y.is_finite()
                    && r.max().x.is_finite()
                    && r.max().y.is_finite()
            }) else {
                return Err(LocateError::BadPolygon { grid_code });
            };
            boxes.push(GeomWithData::new(
                Rectangle::from_corners([rect.min().x, rect.min().y], [rect.max().x, rect.max().y]),
                entries.len() as u32,
            ));
            entries.push(Entry {
                grid_code,
                community_id,
                polygon,
            });
        }
        Ok(LocateIndex {
            entries,
            tree: RTree::bulk_load(boxes),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The grid covering (lon, lat); on a shared border the first grid found wins.
    pub fn locate(&self, lon: f64, lat: f64) -> Located<'_> {
        let point = [lon, lat];
        for candidate in self.tree.locate_all_at_point(&point) {
            let entry = &self.entries[candidate.data as usize];
            if polygon_covers(&entry.polygon, Coord { x: lon, y: lat }) {
                return Located::Grid {
                    grid_code: &entry.grid_code,
                    community_id: &entry.community_id,
                };
            }
        }
        Located::Unserved
    }
}

/// Even-odd crossing test, boundary points count as inside (tested separately).
fn polygon_covers(polygon: &Polygon<f64>, c: Coord<f64>) -> bool {
    let mut inside = ring_crosses(polygon.exterior(), c);
    for hole in polygon.interiors() {
        if ring_crosses(hole, c) {
            inside = !inside;
        }
    }
    inside
}

fn ring_crosses(ring: &LineString<f64>, c: Coord<f64>) -> bool {
    let mut inside = false;
    let points = &ring.0;
    if points.len() < 3 {
        return false;
    }
    let mut j = points.len() - 1;
    for i in 0..points.len() {
        let (a, b) = (points[i], points[j]);
        if (a.y > c.y) != (b.y > c.y) {
            let x = (b.x - a.x) * (c.y - a.y) / (b.y - a.y) + a.x;
            if c.x < x {
                inside = !inside;
            }
        }
        j = i;
    }
    inside
}
