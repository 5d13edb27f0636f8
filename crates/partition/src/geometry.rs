//! Small geometric helpers in local metres: projection, Hilbert keys, compactness, sampling.

use geo::{Area, Coord, Euclidean, Length, LineString, MultiPolygon, Polygon};

/// Metres per degree of latitude (mean); good to ~0.5% which is plenty for grid shapes.
const METRES_PER_DEGREE: f64 = 111_320.0;

/// Local equirectangular projection around a community's centre: cheap, invertible, and
/// accurate enough at community scale (a few km) for shapes and compactness.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Projection {
    lon0: f64,
    lat0: f64,
    kx: f64,
}

impl Projection {
    pub(crate) fn around(center: Coord<f64>) -> Projection {
        Projection {
            lon0: center.x,
            lat0: center.y,
            kx: METRES_PER_DEGREE * center.y.to_radians().cos().max(0.01),
        }
    }

    pub(crate) fn forward(&self, c: Coord<f64>) -> Coord<f64> {
        Coord {
            x: (c.x - self.lon0) * self.kx,
            y: (c.y - self.lat0) * METRES_PER_DEGREE,
        }
    }

    pub(crate) fn inverse(&self, c: Coord<f64>) -> Coord<f64> {
        Coord {
            x: c.x / self.kx + self.lon0,
            y: c.y / METRES_PER_DEGREE + self.lat0,
        }
    }

    pub(crate) fn forward_polygon(&self, p: &Polygon<f64>) -> Polygon<f64> {
        let map = |ring: &LineString<f64>| ring.coords().map(|c| self.forward(*c)).collect();
        Polygon::new(map(p.exterior()), p.interiors().iter().map(map).collect())
    }

    pub(crate) fn inverse_polygon(&self, p: &Polygon<f64>) -> Polygon<f64> {
        let map = |ring: &LineString<f64>| ring.coords().map(|c| self.inverse(*c)).collect();
        Polygon::new(map(p.exterior()), p.interiors().iter().map(map).collect())
    }
}

/// Hilbert index of (x, y) on a 2^16 × 2^16 lattice spanning `[min, min + size]`.
pub(crate) fn hilbert_key(c: Coord<f64>, min: Coord<f64>, size: f64) -> u64 {
    const ORDER_BITS: u32 = 16;
    let side = (1u64 << ORDER_BITS) - 1;
    let scale = |v: f64, lo: f64| (((v - lo) / size).clamp(0.0, 1.0) * side as f64) as u64;
    let (mut x, mut y) = (scale(c.x, min.x), scale(c.y, min.y));
    let mut d = 0u64;
    let mut s = 1u64 << (ORDER_BITS - 1);
    while s > 0 {
        let rx = u64::from(x & s > 0);
        let ry = u64::from(y & s > 0);
        d += s * s * ((3 * rx) ^ ry);
        if ry == 0 {
            if rx == 1 {
                x = side - x;
                y = side - y;
            }
            std::mem::swap(&mut x, &mut y);
        }
        s >>= 1;
    }
    d
}

/// A polygon's perimeter, its holes' rings included.
pub(crate) fn perimeter(p: &Polygon<f64>) -> f64 {
    Euclidean.length(p.exterior())
        + p.interiors()
            .iter()
            .map(|ring| Euclidean.length(ring))
            .sum::<f64>()
}

/// Polsby–Popper compactness 4πA/P² (1 for a disc); perimeter includes holes.
pub(crate) fn polsby_popper(p: &Polygon<f64>) -> f64 {
    let perimeter = perimeter(p);
    if perimeter <= 0.0 {
        return 0.0;
    }
    4.0 * std::f64::consts::PI * p.unsigned_area() / (perimeter * perimeter)
}

/// Points along a closed ring, about `spacing` apart, always including the ring's vertices.
pub(crate) fn sample_ring(ring: &LineString<f64>, spacing: f64, out: &mut Vec<Coord<f64>>) {
    for line in ring.lines() {
        let length = Euclidean.length(&line);
        let steps = (length / spacing).ceil().max(1.0) as usize;
        for step in 0..steps {
            let t = step as f64 / steps as f64;
            out.push(Coord {
                x: line.start.x + (line.end.x - line.start.x) * t,
                y: line.start.y + (line.end.y - line.start.y) * t,
            });
        }
    }
}

/// Signed area of a closed ring (positive when counter-clockwise).
pub(crate) fn signed_area(ring: &[Coord<f64>]) -> f64 {
    let mut twice = 0.0;
    for pair in ring.windows(2) {
        twice += pair[0].x * pair[1].y - pair[1].x * pair[0].y;
    }
    twice / 2.0
}

pub(crate) fn multipolygon_area(mp: &MultiPolygon<f64>) -> f64 {
    mp.unsigned_area()
}
