#[test]
fn probe() {
    let city = partition::synthetic::city(7, 2000, 2000);
    let t = std::time::Instant::now();
    let p = partition::partition(&city[0]).unwrap();
    let el = t.elapsed();
    let q = &p.quality;
    eprintln!("grids {} in_range {} disc {} flagged {} pp50 {:.3} pp10 {:.3} time {:?}", q.grids, q.in_range, q.disconnected, q.flagged, q.polsby_popper_quantile(0.5), q.polsby_popper_quantile(0.1), el);
    for g in p.grids.iter().filter(|g| !g.flags.is_empty()) { eprintln!("{} {} {:?}", g.grid_code, g.households, g.flags); }
}
