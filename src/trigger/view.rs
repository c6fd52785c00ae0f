//! The packages of one selection split into the sub-groups of one `group_by`, kept in
//! memory between cycles and brought up to date from what changed, so that a cycle's cost
//! follows the change and not the size of the archive. Pure: the database layer supplies
//! the rows.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use crate::filter::{Dimension, SubGroup, sub_group_key};

/// A sub-group's index in its view; stable for the view's life.
pub type GroupId = u32;

/// One sub-group and its packages.
#[derive(Debug, Clone)]
pub struct Group {
    pub sub_group: SubGroup,
    pub key: String,
    /// Package ids, sorted. Empty once every package has left.
    pub members: Vec<i64>,
}

/// The sub-groups of one selection under one `group_by`.
#[derive(Debug, Clone, Default)]
pub struct View {
    dims: Vec<Dimension>,
    groups: Vec<Group>,
    // Group ids by key; the keys themselves live in `groups` only.
    by_key: HashTable<GroupId>,
    hasher: RandomState,
    // Package → group as two sorted parallel vectors: 12 bytes a package, where a hash
    // map would take about three times that at a million packages.
    package_ids: Vec<i64>,
    package_groups: Vec<GroupId>,
}

/// Collects a view's rows as they stream from the database, without keeping the rows.
#[derive(Debug)]
pub struct ViewBuilder {
    dims: Vec<Dimension>,
    // Joined dimension values → provisional group id.
    by_values: HashMap<String, GroupId>,
    values: Vec<Vec<String>>,
    ids: Vec<i64>,
    groups: Vec<GroupId>,
    buffer: String,
}

impl ViewBuilder {
    pub fn new(dims: &[Dimension]) -> ViewBuilder {
        ViewBuilder {
            dims: dims.to_vec(),
            by_values: HashMap::new(),
            values: Vec::new(),
            ids: Vec::new(),
            groups: Vec::new(),
            buffer: String::new(),
        }
    }

    /// Adds one package with its dimension values (in `dims` order).
    pub fn push<'v>(&mut self, id: i64, values: impl Iterator<Item = &'v str> + Clone) {
        self.buffer.clear();
        for v in values.clone() {
            // NUL cannot occur in PostgreSQL text, so it separates values unambiguously.
            self.buffer.push_str(v);
            self.buffer.push('\0');
        }
        let group = match self.by_values.get(self.buffer.as_str()) {
            Some(g) => *g,
            None => {
                let g = self.values.len() as GroupId;
                self.by_values.insert(self.buffer.clone(), g);
                self.values.push(values.map(str::to_owned).collect());
                g
            }
        };
        self.ids.push(id);
        self.groups.push(group);
    }

    /// The view. Group ids follow the sub-groups' sort order, so the same data gives the
    /// same ids whatever order the rows came in.
    pub fn finish(self) -> View {
        let ViewBuilder {
            dims,
            values,
            mut ids,
            groups,
            ..
        } = self;
        drop(self.by_values);
        let mut order: Vec<GroupId> = (0..values.len() as GroupId).collect();
        order.sort_by(|a, b| values[*a as usize].cmp(&values[*b as usize]));
        let mut renumber = vec![0 as GroupId; values.len()];
        for (new, old) in order.iter().enumerate() {
            renumber[*old as usize] = new as GroupId;
        }
        let mut groups: Vec<GroupId> = groups.into_iter().map(|g| renumber[g as usize]).collect();
        // Rows mostly arrive in id order (a table scan); sort them when they did not.
        if !ids.is_sorted() {
            let mut perm: Vec<u32> = (0..ids.len() as u32).collect();
            perm.sort_unstable_by_key(|i| ids[*i as usize]);
            ids = perm.iter().map(|i| ids[*i as usize]).collect();
            groups = perm.iter().map(|i| groups[*i as usize]).collect();
        }
        let mut view = View {
            dims,
            ..Default::default()
        };
        let mut values: Vec<Option<Vec<String>>> = values.into_iter().map(Some).collect();
        for old in order {
            let v = values[old as usize].take().expect("each group once");
            view.push_group(v);
        }
        let mut sizes = vec![0usize; view.groups.len()];
        for g in &groups {
            sizes[*g as usize] += 1;
        }
        for (group, size) in view.groups.iter_mut().zip(sizes) {
            group.members.reserve_exact(size);
        }
        let mut last = None;
        let mut keep = 0;
        for i in 0..ids.len() {
            // A package listed twice (it cannot be, but a join could) counts once.
            if last == Some(ids[i]) {
                continue;
            }
            last = Some(ids[i]);
            view.groups[groups[i] as usize].members.push(ids[i]);
            ids[keep] = ids[i];
            groups[keep] = groups[i];
            keep += 1;
        }
        ids.truncate(keep);
        groups.truncate(keep);
        ids.shrink_to_fit();
        groups.shrink_to_fit();
        view.package_ids = ids;
        view.package_groups = groups;
        view
    }
}

impl View {
    /// Builds a view from `(package, dimension values)` rows in any order.
    pub fn build(dims: &[Dimension], rows: impl IntoIterator<Item = (i64, Vec<String>)>) -> View {
        let mut builder = ViewBuilder::new(dims);
        for (id, values) in rows {
            builder.push(id, values.iter().map(String::as_str));
        }
        builder.finish()
    }

    fn push_group(&mut self, values: Vec<String>) -> GroupId {
        let id = self.groups.len() as GroupId;
        let sub_group = SubGroup {
            values: self.dims.iter().copied().zip(values).collect(),
        };
        let key = sub_group.key();
        let hash = self.hasher.hash_one(&key);
        let groups = &self.groups;
        let hasher = &self.hasher;
        self.by_key
            .insert_unique(hash, id, |g| hasher.hash_one(&groups[*g as usize].key));
        self.groups.push(Group {
            sub_group,
            key,
            members: Vec::new(),
        });
        id
    }

    pub fn dims(&self) -> &[Dimension] {
        &self.dims
    }

    /// How many group ids there are (including emptied groups).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    pub fn package_count(&self) -> usize {
        self.package_ids.len()
    }

    pub fn group(&self, id: GroupId) -> &Group {
        &self.groups[id as usize]
    }

    pub fn group_by_key(&self, key: &str) -> Option<GroupId> {
        let hash = self.hasher.hash_one(key);
        self.by_key
            .find(hash, |g| self.groups[*g as usize].key == key)
            .copied()
    }

    pub fn group_of(&self, package: i64) -> Option<GroupId> {
        self.package_ids
            .binary_search(&package)
            .ok()
            .map(|i| self.package_groups[i])
    }

    /// For every group of this view, the groups of `upstream` holding its packages
    /// (sorted, each once): one merge of the two sorted package lists.
    pub fn cover_in(&self, upstream: &View) -> Vec<Vec<GroupId>> {
        let mut cover: Vec<Vec<GroupId>> = vec![Vec::new(); self.groups.len()];
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.package_ids, &upstream.package_ids);
        while i < a.len() && j < b.len() {
            match a[i].cmp(&b[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    let list = &mut cover[self.package_groups[i] as usize];
                    let up = upstream.package_groups[j];
                    if list.last() != Some(&up) {
                        list.push(up);
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        for list in &mut cover {
            list.sort_unstable();
            list.dedup();
        }
        cover
    }

    /// The groups of this view that hold any of `packages`, sorted, each once.
    pub fn groups_of(&self, packages: &[i64]) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> = packages.iter().filter_map(|p| self.group_of(*p)).collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// Applies a re-selection of the packages in `changed` (sorted, each once): `current`
    /// holds the ones still selected with their dimension values; the others have left.
    /// Returns the groups whose membership changed, sorted.
    pub fn apply(&mut self, changed: &[i64], current: &HashMap<i64, Vec<String>>) -> Vec<GroupId> {
        let mut dirty = Vec::new();
        // (package, new group or None) for every package that moved, joined or left.
        let mut moves: Vec<(i64, Option<GroupId>)> = Vec::new();
        for &package in changed {
            let old = self.group_of(package);
            let new = current.get(&package).map(|values| {
                let pairs: Vec<(Dimension, String)> = self
                    .dims
                    .iter()
                    .copied()
                    .zip(values.iter().cloned())
                    .collect();
                match self.group_by_key(&sub_group_key(&pairs)) {
                    Some(g) => g,
                    None => self.push_group(values.clone()),
                }
            });
            if old == new {
                continue;
            }
            if let Some(g) = old {
                let members = &mut self.groups[g as usize].members;
                if let Ok(i) = members.binary_search(&package) {
                    members.remove(i);
                }
                dirty.push(g);
            }
            if let Some(g) = new {
                let members = &mut self.groups[g as usize].members;
                if let Err(i) = members.binary_search(&package) {
                    members.insert(i, package);
                }
                dirty.push(g);
            }
            moves.push((package, new));
        }
        self.apply_moves(moves);
        dirty.sort_unstable();
        dirty.dedup();
        dirty
    }

    /// Updates the package → group vectors: appends when only new, larger ids arrive (new
    /// packages), else one merge pass over the whole (linear, not linear per package).
    fn apply_moves(&mut self, moves: Vec<(i64, Option<GroupId>)>) {
        let last = self.package_ids.last().copied();
        if moves
            .iter()
            .all(|(id, g)| g.is_some() && last.is_none_or(|l| *id > l))
        {
            for (id, g) in moves {
                self.package_ids.push(id);
                self.package_groups.push(g.expect("checked above"));
            }
            return;
        }
        let mut ids = Vec::with_capacity(self.package_ids.len() + moves.len());
        let mut groups = Vec::with_capacity(ids.capacity());
        let mut moves = moves.into_iter().peekable();
        let mut old = self
            .package_ids
            .iter()
            .copied()
            .zip(self.package_groups.iter().copied())
            .peekable();
        loop {
            let next_old = old.peek().map(|(id, _)| *id);
            let next_move = moves.peek().map(|(id, _)| *id);
            match (next_old, next_move) {
                (None, None) => break,
                (Some(o), m) if m.is_none_or(|m| o < m) => {
                    let (id, g) = old.next().expect("peeked");
                    ids.push(id);
                    groups.push(g);
                }
                (o, Some(m)) => {
                    if o == Some(m) {
                        old.next();
                    }
                    let (id, g) = moves.next().expect("peeked");
                    if let Some(g) = g {
                        ids.push(id);
                        groups.push(g);
                    }
                }
                (Some(_), None) => unreachable!("covered by the arm above"),
            }
        }
        self.package_ids = ids;
        self.package_groups = groups;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(list: &[(i64, &str)]) -> Vec<(i64, Vec<String>)> {
        list.iter()
            .map(|(id, v)| (*id, vec![(*v).to_owned()]))
            .collect()
    }

    fn current(list: &[(i64, &str)]) -> HashMap<i64, Vec<String>> {
        rows(list).into_iter().collect()
    }

    #[test]
    fn build_groups_packages_in_sub_group_order() {
        let view = View::build(
            &[Dimension::Source],
            rows(&[(5, "b"), (1, "a"), (3, "b"), (2, "a")]),
        );
        assert_eq!(view.group_count(), 2);
        assert_eq!(view.group(0).key, "source=a");
        assert_eq!(view.group(0).members, vec![1, 2]);
        assert_eq!(view.group(1).members, vec![3, 5]);
        assert_eq!(view.group_of(5), Some(1));
        assert_eq!(view.group_of(4), None);
        assert_eq!(view.group_by_key("source=b"), Some(1));
        assert_eq!(view.groups_of(&[1, 2, 3, 9]), vec![0, 1]);
    }

    #[test]
    fn apply_adds_moves_and_removes_packages() {
        let mut view = View::build(&[Dimension::Source], rows(&[(1, "a"), (2, "a"), (3, "b")]));
        // 4 arrives in a new group, 2 moves to b, 3 leaves, 1 is rewritten but stays.
        let dirty = view.apply(&[1, 2, 3, 4], &current(&[(1, "a"), (2, "b"), (4, "c")]));
        assert_eq!(dirty, vec![0, 1, 2]);
        assert_eq!(view.group(0).members, vec![1]);
        assert_eq!(view.group(1).members, vec![2]);
        assert_eq!(view.group(2).key, "source=c");
        assert_eq!(view.group(2).members, vec![4]);
        assert_eq!(view.group_of(3), None);
        assert_eq!(view.group_of(2), Some(1));
        assert_eq!(view.package_count(), 3);
    }

    #[test]
    fn apply_appends_new_packages_and_ignores_unchanged_ones() {
        let mut view = View::build(&[Dimension::Source], rows(&[(1, "a")]));
        assert!(view.apply(&[1], &current(&[(1, "a")])).is_empty());
        assert_eq!(
            view.apply(&[7, 8], &current(&[(7, "a"), (8, "a")])),
            vec![0]
        );
        assert_eq!(view.group(0).members, vec![1, 7, 8]);
        assert_eq!(view.group_of(8), Some(0));
        // A package that never was selected and still is not changes nothing.
        assert!(view.apply(&[9], &current(&[])).is_empty());
    }

    #[test]
    fn apply_matches_a_fresh_build() {
        // Random-ish edits, then compare with building from the final state.
        let mut state: HashMap<i64, String> =
            (0..200).map(|i| (i, format!("s{}", i % 7))).collect();
        let to_rows = |s: &HashMap<i64, String>| -> Vec<(i64, Vec<String>)> {
            s.iter().map(|(id, v)| (*id, vec![v.clone()])).collect()
        };
        let mut view = View::build(&[Dimension::Source], to_rows(&state));
        let mut x: u64 = 42;
        for round in 0..50 {
            let mut changed = Vec::new();
            for _ in 0..10 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let id = (x >> 33) as i64 % 260;
                match (x >> 20) % 3 {
                    0 => {
                        state.remove(&id);
                    }
                    _ => {
                        state.insert(id, format!("s{}", (x >> 40) % 9));
                    }
                }
                changed.push(id);
            }
            changed.sort_unstable();
            changed.dedup();
            let current: HashMap<i64, Vec<String>> = changed
                .iter()
                .filter_map(|id| state.get(id).map(|v| (*id, vec![v.clone()])))
                .collect();
            view.apply(&changed, &current);
            let fresh = View::build(&[Dimension::Source], to_rows(&state));
            for (id, v) in &state {
                let g = view.group_of(*id).expect("selected package has a group");
                assert_eq!(view.group(g).sub_group.values[0].1, *v, "round {round}");
                assert!(view.group(g).members.binary_search(id).is_ok());
            }
            assert_eq!(view.package_count(), fresh.package_count(), "round {round}");
            let members: usize = (0..view.group_count() as GroupId)
                .map(|g| view.group(g).members.len())
                .sum();
            assert_eq!(members, state.len(), "round {round}");
        }
    }
}
