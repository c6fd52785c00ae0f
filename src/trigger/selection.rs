//! The packages a pipeline's data grouping selects, split into each `group_by`'s
//! sub-groups, built in one pass over the packages and kept up to date from the changes.

use std::collections::{BTreeSet, HashMap};

use crate::db::changes::Changes;
use crate::db::filter_sql::SelectionSpec;
use crate::db::{Database, DbError};
use crate::filter::{Dimension, Rule};

use super::view::{GroupId, View, ViewBuilder};

/// A re-selection of more packages than this rebuilds the selection instead.
pub(super) const REBUILD_ABOVE: usize = 50_000;

/// Each group of a view with the groups of an upstream view holding its packages.
pub(super) type Cover = std::sync::Arc<Vec<Vec<GroupId>>>;

/// A selection to build: its rules, instrument-module scope and the `group_by`s wanted.
pub(super) type SelectionToBuild<'a> = (&'a [Rule], Option<i64>, &'a BTreeSet<Vec<Dimension>>);

/// One selection's packages, split by each `group_by` its pipelines use.
#[derive(Debug)]
pub(super) struct SelectionCache {
    /// The dimensions the query reads: every view's, each once.
    pub(super) dims: Vec<Dimension>,
    pub(super) views: Vec<View>,
    /// Per view, the groups whose membership changed in this cycle.
    pub(super) dirty: Vec<Vec<GroupId>>,
    /// Built in this cycle: every pipeline on it is evaluated in full.
    pub(super) rebuilt: bool,
    /// Per (view, upstream view), each group's upstream groups: computed once a cycle
    /// when a full pass needs it, and shared by the pipelines on this selection.
    pub(super) covers: std::sync::Mutex<HashMap<(usize, usize), Cover>>,
}

impl SelectionCache {
    /// Each group of view `down` with the groups of view `up` holding its packages.
    pub(super) fn cover(&self, down: usize, up: usize) -> Cover {
        let mut covers = self
            .covers
            .lock()
            .expect("never poisoned: no panics inside");
        covers
            .entry((down, up))
            .or_insert_with(|| std::sync::Arc::new(self.views[down].cover_in(&self.views[up])))
            .clone()
    }

    pub(super) fn view_index(&self, dims: &[Dimension]) -> usize {
        self.views
            .iter()
            .position(|v| v.dims() == dims)
            .expect("the selection was built for every step's dimensions")
    }

    /// Builds the caches of several selections from one pass over the packages.
    pub(super) async fn build_many(
        db: &Database,
        wanted: &[SelectionToBuild<'_>],
    ) -> Result<Vec<SelectionCache>, DbError> {
        let started = std::time::Instant::now();
        // Every dimension any view needs, each once: the query's dimension columns.
        let mut all_dims: Vec<Dimension> = Vec::new();
        for (_, _, sets) in wanted {
            for d in sets.iter().flatten() {
                if !all_dims.contains(d) {
                    all_dims.push(*d);
                }
            }
        }
        let position = |d: &Dimension| all_dims.iter().position(|x| x == d).expect("collected");
        // Per selection, per view: its builder and where its values sit in a row.
        let mut builders: Vec<Vec<(ViewBuilder, Vec<usize>)>> = wanted
            .iter()
            .map(|(_, _, sets)| {
                sets.iter()
                    .map(|set| (ViewBuilder::new(set), set.iter().map(position).collect()))
                    .collect()
            })
            .collect();
        let specs: Vec<SelectionSpec<'_>> = wanted
            .iter()
            .map(|(rules, scope, _)| SelectionSpec {
                rules,
                instrument_module_id: *scope,
            })
            .collect();
        db.for_each_shared(
            &specs,
            &all_dims,
            None,
            |id, values: &[&str], matches: &[bool]| {
                for (s, matched) in matches.iter().enumerate() {
                    if *matched {
                        for (builder, positions) in &mut builders[s] {
                            builder.push(id, positions.iter().map(|p| values[*p]));
                        }
                    }
                }
            },
        )
        .await?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "selection rows read"
        );
        Ok(builders
            .into_iter()
            .zip(wanted)
            .map(|(views, (_, _, sets))| {
                let dims: Vec<Dimension> = sets.iter().flatten().fold(Vec::new(), |mut acc, d| {
                    if !acc.contains(d) {
                        acc.push(*d);
                    }
                    acc
                });
                let views: Vec<View> = views.into_iter().map(|(b, _)| b.finish()).collect();
                SelectionCache {
                    dims,
                    dirty: vec![Vec::new(); views.len()],
                    views,
                    rebuilt: true,
                    covers: Default::default(),
                }
            })
            .collect())
    }

    /// Applies the re-selected changed packages (`current`: id → values of the
    /// dimensions `dims`) to every view, noting which groups changed.
    pub(super) fn apply(
        &mut self,
        changes: &Changes,
        dims: &[Dimension],
        current: &HashMap<i64, Vec<String>>,
    ) {
        let mut changed: Vec<i64> = changes
            .packages
            .iter()
            .chain(&changes.deleted_packages)
            .copied()
            .collect();
        changed.sort_unstable();
        changed.dedup();
        for (v, view) in self.views.iter_mut().enumerate() {
            let positions: Vec<usize> = view
                .dims()
                .iter()
                .map(|d| {
                    dims.iter()
                        .position(|x| x == d)
                        .expect("read for every view")
                })
                .collect();
            let projected: HashMap<i64, Vec<String>> = current
                .iter()
                .map(|(id, values)| (*id, positions.iter().map(|p| values[*p].clone()).collect()))
                .collect();
            self.dirty[v] = view.apply(&changed, &projected);
        }
    }
}
