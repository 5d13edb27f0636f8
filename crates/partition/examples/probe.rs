//! Profiling and debugging harness: partition the communities of the seeded synthetic city
//! (the one `wangge bench partition` measures) one by one on this thread and print a line per
//! flagged grid (disconnected, out of range, ...), then totals. Run under callgrind for instruction counts:
//! `valgrind --tool=callgrind target/release/examples/probe 2000 1`.
//!
//! Arguments: buildings (default 2000), repetitions (1), seed (42), only this community id.

fn main() {
    let mut args = std::env::args().skip(1);
    let buildings: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let repeat: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(42);
    let only: Option<String> = args.next();
    let mut city = partition::synthetic::city(seed, buildings, 2_000);
    if let Some(only) = &only {
        city.retain(|c| &c.id == only);
    }
    let mut total = partition::Quality::default();
    for _ in 0..repeat {
        for community in &city {
            let p = partition::partition(community).expect("partition");
            for grid in p
                .grids
                .iter()
                .filter(|g| !g.detached.is_empty() || !g.flags.is_empty())
            {
                println!(
                    "{} {} households {} members {} detached {} flags {:?}",
                    community.id,
                    grid.grid_code,
                    grid.households,
                    grid.members.len(),
                    grid.detached.len(),
                    grid.flags
                );
                if std::env::var("PROBE_DETAIL").is_ok() {
                    for part in &grid.detached {
                        let inside: Vec<&str> = community
                            .buildings
                            .iter()
                            .filter(|b| geo::Intersects::intersects(part, &b.position))
                            .map(|b| b.id.as_str())
                            .collect();
                        println!(
                            "  detached area {:.3e} vertices {} holds {inside:?}",
                            geo::Area::unsigned_area(part),
                            part.exterior().0.len()
                        );
                        println!("  {:?}", part.exterior().0);
                    }
                    println!("  main vertices {}", grid.polygon.exterior().0.len());
                    println!("  {:?}", grid.polygon.exterior().0);
                    println!("  boundary {:?}", community.boundary.0[0].exterior().0);
                }
            }
            total.merge(&p.quality);
        }
    }
    println!(
        "grids {} in_range {} disconnected {} flagged {} pp_median {:.3} pp_p10 {:.3}",
        total.grids,
        total.in_range,
        total.disconnected,
        total.flagged,
        total.polsby_popper_quantile(0.5),
        total.polsby_popper_quantile(0.1)
    );
}
