//! The registry's working state: every community folded from the GRIDS stream, and the locate
//! index built from their grids, published to [`Locator`] handles through a `watch` channel so
//! readers never wait for the writer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use eventstore::{Position, RecordedCommit};
use geo::BoundingRect as _;
use partition::locate::{LocateError, LocateIndex, Located};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::{AABB, RTree};
use tokio::sync::watch;

use crate::api::LocateAnswer;
use crate::domain::{Community, Event, GridWorker, evolve};

/// One community's part of the locate view: its own grid index, rebuilt only when the
/// community changes.
#[derive(Debug)]
struct CommunityView {
    community_id: String,
    community_code: String,
    community_name: String,
    street: String,
    district: String,
    index: LocateIndex,
    workers: HashMap<String, GridWorker>,
    grids: usize,
    /// The community's grid codes, in `buildings`' grid index order.
    grid_codes: Vec<String>,
    /// Every building that is a member of a grid: id → (index into `grid_codes`, lon/lat).
    /// Built with the community's grid index, so a change costs what that community holds.
    buildings: HashMap<String, (u32, [f64; 2])>,
}

impl CommunityView {
    fn build(entry: &Entry) -> Result<Option<CommunityView>, LocateError> {
        let community = &entry.community;
        let Some(profile) = &community.profile else {
            return Ok(None);
        };
        let mut polygons = Vec::new();
        let mut grid_codes = Vec::with_capacity(community.grids.len());
        let mut buildings = HashMap::with_capacity(community.buildings.len());
        for (code, grid) in &community.grids {
            for polygon in std::iter::once(&grid.polygon).chain(&grid.detached) {
                polygons.push((code.clone(), community.id.clone(), polygon.clone()));
            }
            let grid_index = grid_codes.len() as u32;
            grid_codes.push(code.clone());
            for member in &grid.members {
                // A member without a building record (never expected: grids are drawn from
                // the community's buildings) cannot be placed, so it is not indexed.
                if let Some(building) = community.buildings.get(member) {
                    buildings.insert(
                        member.clone(),
                        (grid_index, [building.position.x(), building.position.y()]),
                    );
                }
            }
        }
        Ok(Some(CommunityView {
            community_id: community.id.clone(),
            community_code: profile.code.clone(),
            community_name: profile.name.clone(),
            street: profile.street.clone(),
            district: profile.district.clone(),
            index: LocateIndex::build(polygons)?,
            workers: community
                .workers
                .iter()
                .map(|(code, worker)| (code.clone(), worker.clone()))
                .collect(),
            grids: community.grids.len(),
            grid_codes,
            buildings,
        }))
    }

    fn served(&self, grid_code: &str) -> LocateAnswer {
        LocateAnswer::Served {
            community: self.community_id.clone(),
            community_code: self.community_code.clone(),
            community_name: self.community_name.clone(),
            grid_code: grid_code.to_owned(),
            grid_worker: self.workers.get(grid_code).cloned(),
            street: self.street.clone(),
            district: self.district.clone(),
        }
    }

    /// The community's extent: the bounding box of its grids.
    fn extent(entry: &Entry) -> Option<Rectangle<[f64; 2]>> {
        let mut rect: Option<geo::Rect<f64>> = None;
        for grid in entry.community.grids.values() {
            for polygon in std::iter::once(&grid.polygon).chain(&grid.detached) {
                if let Some(r) = polygon.bounding_rect() {
                    rect = Some(match rect {
                        None => r,
                        Some(acc) => geo::Rect::new(
                            geo::Coord {
                                x: acc.min().x.min(r.min().x),
                                y: acc.min().y.min(r.min().y),
                            },
                            geo::Coord {
                                x: acc.max().x.max(r.max().x),
                                y: acc.max().y.max(r.max().y),
                            },
                        ),
                    });
                }
            }
        }
        rect.map(|r| Rectangle::from_corners([r.min().x, r.min().y], [r.max().x, r.max().y]))
    }
}

/// An immutable view for locating points: an R-tree of community extents over one grid index
/// per community, so a change rebuilds one community's index and the (small) top tree.
///
/// Building ids are looked up in each community's own map in turn (one hash lookup per
/// community) rather than in one map over the whole city: such a map would have to be
/// rebuilt over every building after any change, and an import of a million buildings
/// publishes hundreds of times.
#[derive(Debug)]
pub struct LocateView {
    communities: Vec<Arc<CommunityView>>,
    tree: RTree<GeomWithData<Rectangle<[f64; 2]>, usize>>,
    grids: usize,
}

impl LocateView {
    fn empty() -> LocateView {
        LocateView {
            communities: Vec::new(),
            tree: RTree::new(),
            grids: 0,
        }
    }

    pub fn grids(&self) -> usize {
        self.grids
    }

    pub fn locate(&self, lon: f64, lat: f64) -> LocateAnswer {
        if !(lon.is_finite() && lat.is_finite()) {
            return LocateAnswer::rejected("bad_coordinates", "lon and lat must be finite");
        }
        if !(-180.0..=180.0).contains(&lon) || !(-90.0..=90.0).contains(&lat) {
            return LocateAnswer::rejected(
                "bad_coordinates",
                format!("({lon}, {lat}) is outside WGS84 lon -180..180, lat -90..90"),
            );
        }
        for candidate in self
            .tree
            .locate_in_envelope_intersecting(&AABB::from_point([lon, lat]))
        {
            let view = &self.communities[candidate.data];
            if let Located::Grid { grid_code, .. } = view.index.locate(lon, lat) {
                return view.served(grid_code);
            }
        }
        LocateAnswer::Unserved
    }

    /// Which grid holds the building `building_id` (a member of one of its grids), and where
    /// the building stands. `None`: no grid holds a building of that id. A building id held
    /// by two communities is answered `Rejected` with `ambiguous_building`.
    pub fn locate_building(&self, building_id: &str) -> Option<BuildingAnswer> {
        let mut holders = self
            .communities
            .iter()
            .filter_map(|view| Some((view, view.buildings.get(building_id)?)));
        let (view, (grid, position)) = holders.next()?;
        if holders.next().is_some() {
            return Some(BuildingAnswer {
                answer: LocateAnswer::rejected(
                    "ambiguous_building",
                    format!("building id {building_id:?} is held by more than one community"),
                ),
                position: None,
            });
        }
        Some(BuildingAnswer {
            answer: view.served(&view.grid_codes[*grid as usize]),
            position: Some(*position),
        })
    }
}

/// The answer to a building lookup: the grid as for a point, and the building's position
/// (WGS84 lon/lat) when the id is known and unambiguous.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildingAnswer {
    pub answer: LocateAnswer,
    pub position: Option<[f64; 2]>,
}

/// In-process locate handle: cheap to clone, never blocks on the registry's writer, always
/// answers from the latest published state.
#[derive(Debug, Clone)]
pub struct Locator {
    view: watch::Receiver<Arc<LocateView>>,
}

impl Locator {
    /// Which grid serves (lon, lat) (WGS84 degrees)?
    pub fn locate(&self, lon: f64, lat: f64) -> LocateAnswer {
        let view = Arc::clone(&self.view.borrow());
        view.locate(lon, lat)
    }

    /// Which grid holds the building `building_id`? See [`LocateView::locate_building`].
    pub fn locate_building(&self, building_id: &str) -> Option<BuildingAnswer> {
        let view = Arc::clone(&self.view.borrow());
        view.locate_building(building_id)
    }

    /// Grids currently indexed.
    pub fn grids(&self) -> usize {
        self.view.borrow().grids()
    }
}

/// One community with where it stands in the stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub community: Community,
    pub position: Position,
}

/// Why a commit could not be folded in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "community {community}: commit at sequence {sequence} starts at version {first_version} but the registry holds version {held}"
    )]
    Gap {
        community: String,
        sequence: u64,
        first_version: u64,
        held: u64,
    },
}

/// Whether a commit was new to the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New,
    AlreadyHeld,
}

/// All communities, keyed by community id (= aggregate id).
#[derive(Debug)]
pub struct Directory {
    communities: BTreeMap<String, Entry>,
    /// Per community: its locate part and extent, as last published.
    views: BTreeMap<String, (Arc<CommunityView>, Rectangle<[f64; 2]>)>,
    publisher: watch::Sender<Arc<LocateView>>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new()
    }
}

impl Directory {
    pub fn new() -> Directory {
        let (publisher, _) = watch::channel(Arc::new(LocateView::empty()));
        Directory {
            communities: BTreeMap::new(),
            views: BTreeMap::new(),
            publisher,
        }
    }

    pub fn locator(&self) -> Locator {
        Locator {
            view: self.publisher.subscribe(),
        }
    }

    pub fn get(&self, community_id: &str) -> Option<&Entry> {
        self.communities.get(community_id)
    }

    pub fn communities(&self) -> usize {
        self.communities.len()
    }

    /// The community to decide on: the held one, or a fresh unregistered one.
    pub fn community_or_new(&self, community_id: &str) -> Entry {
        self.communities
            .get(community_id)
            .cloned()
            .unwrap_or_else(|| Entry {
                community: Community::new(community_id),
                position: Position::NEW,
            })
    }

    /// Folds a stored commit in. A commit the directory already holds (its own append coming
    /// back through the subscription, or a redelivery) is skipped.
    pub fn apply(&mut self, commit: &RecordedCommit<Event>) -> Result<Applied, ApplyError> {
        let id = commit.aggregate.as_str();
        let held = self
            .communities
            .get(id)
            .map(|e| e.position)
            .unwrap_or(Position::NEW);
        if commit.sequence <= held.sequence || commit.version <= held.version {
            return Ok(Applied::AlreadyHeld);
        }
        if commit.first_version != held.version + 1 {
            return Err(ApplyError::Gap {
                community: id.to_owned(),
                sequence: commit.sequence,
                first_version: commit.first_version,
                held: held.version,
            });
        }
        let entry = self
            .communities
            .entry(id.to_owned())
            .or_insert_with(|| Entry {
                community: Community::new(id),
                position: Position::NEW,
            });
        for recorded in &commit.events {
            evolve(&mut entry.community, &recorded.event);
        }
        entry.community.note_command(&commit.command_id);
        entry.position = commit.position();
        Ok(Applied::New)
    }

    /// Folds events this instance just appended (known to be stored at `position`).
    pub fn apply_own(
        &mut self,
        community_id: &str,
        command_id: &str,
        events: &[Event],
        position: Position,
    ) {
        let entry = self
            .communities
            .entry(community_id.to_owned())
            .or_insert_with(|| Entry {
                community: Community::new(community_id),
                position: Position::NEW,
            });
        for event in events {
            evolve(&mut entry.community, event);
        }
        entry.community.note_command(command_id);
        entry.position = position;
    }

    /// Rebuilds every community's locate part and publishes (after a catch-up). A community
    /// whose part cannot be built is left out and logged (its points answer `unserved`)
    /// rather than keeping every other community out of service.
    pub fn publish_all(&mut self) -> Result<usize, LocateError> {
        self.views.clear();
        let ids: Vec<String> = self.communities.keys().cloned().collect();
        for id in &ids {
            if let Err(error) = self.refresh(id) {
                tracing::error!(community = %id, %error, "the community's locate index cannot be built; its points are unserved");
            }
        }
        Ok(self.publish())
    }

    /// Rebuilds one community's locate part and publishes.
    pub fn publish_community(&mut self, community_id: &str) -> Result<usize, LocateError> {
        self.refresh(community_id)?;
        Ok(self.publish())
    }

    /// Rebuilds one community's locate part. When it cannot be built the part it had stays
    /// (before, it was removed first, so a failed build took the community out of locate).
    fn refresh(&mut self, community_id: &str) -> Result<(), LocateError> {
        let built = match self.communities.get(community_id) {
            Some(entry) => match CommunityView::build(entry)? {
                Some(view) => CommunityView::extent(entry).map(|extent| (view, extent)),
                None => None,
            },
            None => None,
        };
        match built {
            Some((view, extent)) => {
                self.views
                    .insert(community_id.to_owned(), (Arc::new(view), extent));
            }
            None => {
                self.views.remove(community_id);
            }
        }
        Ok(())
    }

    /// Publishes a new view from the current community parts; returns the grids indexed.
    fn publish(&self) -> usize {
        let mut communities = Vec::with_capacity(self.views.len());
        let mut boxes = Vec::with_capacity(self.views.len());
        let mut grids = 0;
        for (view, extent) in self.views.values() {
            boxes.push(GeomWithData::new(*extent, communities.len()));
            grids += view.grids;
            communities.push(Arc::clone(view));
        }
        self.publisher.send_replace(Arc::new(LocateView {
            communities,
            tree: RTree::bulk_load(boxes),
            grids,
        }));
        grids
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use geo::{MultiPolygon, Point, Polygon};

    use super::*;
    use crate::domain::{Building, Command, CommunityProfile, decide};

    fn square(x: f64, y: f64, side: f64) -> Polygon<f64> {
        geo::Rect::new((x, y), (x + side, y + side)).to_polygon()
    }

    /// A community `id` of `rows` × 4 buildings of 60 households in a square at (x, 26.26);
    /// building ids are `<prefix>-<row>-<column>`.
    fn community(directory: &mut Directory, id: &str, code: &str, x: f64, prefix: &str) {
        let profile = CommunityProfile {
            code: code.to_owned(),
            name: format!("{id} 社区"),
            street: "列东街道".to_owned(),
            district: "三元区".to_owned(),
            boundary: MultiPolygon::new(vec![square(x, 26.26, 0.004)]),
        };
        let buildings = (0..8)
            .flat_map(|row| (0..4).map(move |column| (row, column)))
            .map(|(row, column)| Building {
                id: format!("{prefix}-{row}-{column}"),
                position: Point::new(
                    x + 0.0005 + 0.001 * f64::from(column),
                    26.2605 + 0.0004 * f64::from(row),
                ),
                households: 60,
                population: None,
            })
            .collect();
        for (command_id, command) in [
            ("register", Command::RegisterCommunity(profile)),
            ("import", Command::ImportBuildings { buildings }),
            ("partition", Command::Partition),
        ] {
            let entry = directory.community_or_new(id);
            let events = decide(&entry.community, command_id, &command, 0).expect("decide");
            let position = Position {
                sequence: entry.position.sequence + 1,
                version: entry.position.version + 1,
                hash: [0; 32],
            };
            directory.apply_own(id, command_id, &events, position);
        }
    }

    fn check(building_id: &str, expect: Expect) {
        let mut directory = Directory::new();
        community(&mut directory, "liedong", "350402001001", 117.63, "b");
        community(&mut directory, "xiyang", "350402001002", 117.64, "x");
        // One building id held by both communities.
        community(&mut directory, "fuxing", "350402001003", 117.65, "shared");
        community(&mut directory, "fuxing-2", "350402001004", 117.66, "shared");
        directory.publish_all().expect("publish");
        let locator = directory.locator();
        let actual = match locator.locate_building(building_id) {
            None => "unknown".to_owned(),
            Some(BuildingAnswer {
                answer: LocateAnswer::Served { grid_code, .. },
                position: Some([lon, lat]),
            }) => {
                // The grid from membership is the one the building's own point lies in.
                let by_point = match locator.locate(lon, lat) {
                    LocateAnswer::Served { grid_code, .. } => grid_code,
                    other => format!("{other:?}"),
                };
                format!("grid {grid_code} at ({lon:.4}, {lat:.4}); by point: {by_point}")
            }
            Some(other) => format!("{other:?}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn building_in_first_community() {
        check(
            "b-0-0",
            expect!["grid 350402001001007 at (117.6305, 26.2605); by point: 350402001001007"],
        );
    }

    #[test]
    fn building_in_second_community() {
        check(
            "x-7-3",
            expect!["grid 350402001002002 at (117.6435, 26.2633); by point: 350402001002002"],
        );
    }

    #[test]
    fn unknown_building() {
        check("b-9-9", expect!["unknown"]);
    }

    #[test]
    fn building_id_in_two_communities() {
        check(
            "shared-1-1",
            expect![[
                r#"BuildingAnswer { answer: Rejected { reason_code: "ambiguous_building", message: "building id \"shared-1-1\" is held by more than one community" }, position: None }"#
            ]],
        );
    }
}
