//! Point-in-grid lookup: which grid serves (lon, lat)?
//!
//! Why a uniform bucket grid over bounding boxes plus an exact point-in-polygon test: grids
//! are small, of similar size and do not overlap, so with buckets about one grid across a
//! point's bucket lists a handful of candidates, found with two multiplications instead of an
//! R-tree descent; a box test rejects most of them and an even-odd test on a few dozen edges
//! (stored flat, in one array) settles the rest. The index is built in one pass from a plain
//! list, so the registry can rebuild it from its grid events at start (or after every change)
//! cheaply. (An R-tree of the same boxes answered 0.77 M lookups per CPU-second on a
//! 50,000-grid city; the buckets answer several times that, see docs/PARTITION.md.)

use geo::{BoundingRect, Coord, Polygon};

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
    #[error("grid {grid_code}: polygon has non-finite coordinates")]
    BadPolygon { grid_code: String },
    #[error("{grids} grids, more than {max}")]
    TooManyGrids { grids: usize, max: usize },
}

/// Largest number of buckets of one index (a bound on memory: 4 bytes each, plus the lists).
pub const BUCKETS_MAX: usize = 4_000_000;
/// Buckets per grid aimed at (each grid's box then covers about four buckets).
const BUCKETS_PER_GRID: f64 = 1.0;

#[derive(Debug)]
struct Entry {
    grid_code: String,
    community_id: String,
}

/// An immutable index of grid polygons (WGS84 lon/lat).
#[derive(Debug)]
pub struct LocateIndex {
    entries: Vec<Entry>,
    /// Per entry: min x, min y, max x, max y.
    boxes: Vec<[f64; 4]>,
    /// Per entry, its rings' range in `ring_start` (exterior first, then holes).
    entry_rings: Vec<u32>,
    /// Per ring, its vertices' range in `vertices` (closed rings: first == last).
    ring_start: Vec<u32>,
    vertices: Vec<Coord<f64>>,
    origin: Coord<f64>,
    /// Buckets per unit of longitude and latitude.
    scale: Coord<f64>,
    columns: usize,
    rows: usize,
    /// Per bucket, its entries' range in `bucket_entries`.
    bucket_start: Vec<u32>,
    bucket_entries: Vec<u32>,
}

impl LocateIndex {
    /// Build from (grid_code, community_id, polygon) triples.
    pub fn build(
        grids: impl IntoIterator<Item = (String, String, Polygon<f64>)>,
    ) -> Result<LocateIndex, LocateError> {
        let mut entries = Vec::new();
        let mut boxes: Vec<[f64; 4]> = Vec::new();
        let mut entry_rings = vec![0u32];
        let mut ring_start = vec![0u32];
        let mut vertices: Vec<Coord<f64>> = Vec::new();
        for (grid_code, community_id, polygon) in grids {
            if entries.len() >= GRIDS_MAX {
                return Err(LocateError::TooManyGrids {
                    grids: entries.len() + 1,
                    max: GRIDS_MAX,
                });
            }
            // A grid without land (an empty polygon: every one of its buildings shares its
            // point with another grid's, as a tower geocoded to one address does) holds no
            // point to find; it is reached by building id. Left out of the index, not an
            // error: failing here took the whole community out of locate.
            let Some(rect) = polygon.bounding_rect() else {
                continue;
            };
            let bounds = [rect.min().x, rect.min().y, rect.max().x, rect.max().y];
            if !bounds.iter().all(|value| value.is_finite()) {
                return Err(LocateError::BadPolygon { grid_code });
            }
            boxes.push(bounds);
            for ring in std::iter::once(polygon.exterior()).chain(polygon.interiors()) {
                if ring.0.len() < 3 {
                    continue;
                }
                vertices.extend_from_slice(&ring.0);
                if ring.0.first() != ring.0.last() {
                    vertices.push(ring.0[0]);
                }
                ring_start.push(vertices.len() as u32);
            }
            entry_rings.push((ring_start.len() - 1) as u32);
            entries.push(Entry {
                grid_code,
                community_id,
            });
        }
        // Bucket size: the mean grid box, grown until the bucket count is within bounds.
        let mut extent = [f64::MAX, f64::MAX, f64::MIN, f64::MIN];
        let (mut width_sum, mut height_sum) = (0.0, 0.0);
        for b in &boxes {
            extent = [
                extent[0].min(b[0]),
                extent[1].min(b[1]),
                extent[2].max(b[2]),
                extent[3].max(b[3]),
            ];
            width_sum += b[2] - b[0];
            height_sum += b[3] - b[1];
        }
        let (columns, rows, origin, scale) = if boxes.is_empty() {
            (0, 0, Coord { x: 0.0, y: 0.0 }, Coord { x: 0.0, y: 0.0 })
        } else {
            let n = boxes.len() as f64;
            let span_x = (extent[2] - extent[0]).max(1e-9);
            let span_y = (extent[3] - extent[1]).max(1e-9);
            let mut cell_x = (width_sum / n).max(span_x * 1e-6) / BUCKETS_PER_GRID.sqrt();
            let mut cell_y = (height_sum / n).max(span_y * 1e-6) / BUCKETS_PER_GRID.sqrt();
            let buckets =
                |cx: f64, cy: f64| ((span_x / cx).floor() + 1.0) * ((span_y / cy).floor() + 1.0);
            while buckets(cell_x, cell_y) > BUCKETS_MAX as f64 {
                cell_x *= 1.5;
                cell_y *= 1.5;
            }
            (
                (span_x / cell_x).floor() as usize + 1,
                (span_y / cell_y).floor() as usize + 1,
                Coord {
                    x: extent[0],
                    y: extent[1],
                },
                Coord {
                    x: 1.0 / cell_x,
                    y: 1.0 / cell_y,
                },
            )
        };
        let bucket_range = |b: &[f64; 4]| {
            let column = |x: f64| (((x - origin.x) * scale.x) as usize).min(columns - 1);
            let row = |y: f64| (((y - origin.y) * scale.y) as usize).min(rows - 1);
            (column(b[0]), column(b[2]), row(b[1]), row(b[3]))
        };
        // Two passes (count, then fill) give a compact list per bucket.
        let mut bucket_start = vec![0u32; columns * rows + 1];
        for b in &boxes {
            let (c0, c1, r0, r1) = bucket_range(b);
            for row in r0..=r1 {
                for column in c0..=c1 {
                    bucket_start[row * columns + column + 1] += 1;
                }
            }
        }
        for i in 1..bucket_start.len() {
            bucket_start[i] += bucket_start[i - 1];
        }
        let mut fill = bucket_start.clone();
        let mut bucket_entries = vec![0u32; bucket_start.last().copied().unwrap_or(0) as usize];
        for (entry, b) in boxes.iter().enumerate() {
            let (c0, c1, r0, r1) = bucket_range(b);
            for row in r0..=r1 {
                for column in c0..=c1 {
                    let bucket = row * columns + column;
                    bucket_entries[fill[bucket] as usize] = entry as u32;
                    fill[bucket] += 1;
                }
            }
        }
        Ok(LocateIndex {
            entries,
            boxes,
            entry_rings,
            ring_start,
            vertices,
            origin,
            scale,
            columns,
            rows,
            bucket_start,
            bucket_entries,
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
        let fx = (lon - self.origin.x) * self.scale.x;
        let fy = (lat - self.origin.y) * self.scale.y;
        // Also false for NaN.
        if !(fx >= 0.0 && fy >= 0.0 && fx < self.columns as f64 && fy < self.rows as f64) {
            return Located::Unserved;
        }
        let bucket = fy as usize * self.columns + fx as usize;
        let range = self.bucket_start[bucket] as usize..self.bucket_start[bucket + 1] as usize;
        let c = Coord { x: lon, y: lat };
        for &entry in &self.bucket_entries[range] {
            let entry = entry as usize;
            let b = &self.boxes[entry];
            if lon < b[0] || lon > b[2] || lat < b[1] || lat > b[3] {
                continue;
            }
            let mut inside = false;
            for ring in self.entry_rings[entry]..self.entry_rings[entry + 1] {
                let ring = ring as usize;
                let points = &self.vertices
                    [self.ring_start[ring] as usize..self.ring_start[ring + 1] as usize];
                inside ^= ring_crosses(points, c);
            }
            if inside {
                let found = &self.entries[entry];
                return Located::Grid {
                    grid_code: &found.grid_code,
                    community_id: &found.community_id,
                };
            }
        }
        Located::Unserved
    }
}

/// Even-odd crossing test of one closed ring (an odd count of crossings to the right).
fn ring_crosses(points: &[Coord<f64>], c: Coord<f64>) -> bool {
    let mut inside = false;
    for pair in points.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if (a.y > c.y) != (b.y > c.y) {
            let x = (b.x - a.x) * (c.y - a.y) / (b.y - a.y) + a.x;
            if c.x < x {
                inside = !inside;
            }
        }
    }
    inside
}
