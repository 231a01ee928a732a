//! One copy of values that many objects repeat: Network names across the nodes' NodeNetworks,
//! label sets across the workloads that other nodes publish (the pods of one Deployment carry
//! the same labels). A reader that holds thousands of such objects keeps each value once.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

/// The shared copies of values of type `T`. Values no holder uses any more are dropped now and
/// then (whenever the set has doubled since the last time), so values that come and go do not
/// make it grow for good.
#[derive(Debug)]
pub struct Interner<T: ?Sized> {
    set: HashSet<Arc<T>>,
    /// Values held after the last clean-up.
    live: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            set: HashSet::new(),
            live: 0,
        }
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    /// The shared copy of `value`, made by `make` when there is none yet.
    pub fn get_or_make(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        if let Some(v) = self.set.get(value) {
            return v.clone();
        }
        if self.set.len() >= 2 * self.live.max(512) {
            self.set.retain(|v| Arc::strong_count(v) > 1);
            self.live = self.set.len();
        }
        let v = make();
        self.set.insert(v.clone());
        v
    }

    /// Replaces `value` with its shared copy (it becomes the shared copy if there is none).
    pub fn share(&mut self, value: &mut Arc<T>) {
        let shared = self.get_or_make(value, || value.clone());
        *value = shared;
    }

    /// How many values the set holds (also the ones about to be dropped).
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether the set holds no value.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Network names shared between the objects that name them.
pub type Names = Interner<str>;

impl Names {
    /// The shared copy of `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        self.get_or_make(name, || Arc::from(name))
    }
}

/// Workload label sets shared between the workloads that carry them.
pub type LabelSets = Interner<BTreeMap<String, String>>;

impl LabelSets {
    /// Shares the labels of `workloads`.
    pub fn share_all<'a>(
        &mut self,
        workloads: impl IntoIterator<Item = &'a mut weft_crds::NodeWorkload>,
    ) {
        for w in workloads {
            self.share(&mut w.labels);
        }
    }

    /// Shares the labels of the workloads of `slice`.
    pub fn share_slice(&mut self, slice: &mut weft_crds::WorkloadSlice) {
        // Just read, each entry has no other holder: `make_mut` copies nothing.
        self.share_all(
            slice
                .spec
                .workloads
                .iter_mut()
                .map(|w| &mut Arc::make_mut(w).workload),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_no_blocks_hold_are_dropped_once_the_set_has_doubled() {
        let mut names = Names::default();
        let kept: Vec<Arc<str>> = (0..10).map(|i| names.get(&format!("kept-{i}"))).collect();
        for i in 0..2000 {
            names.get(&format!("gone-{i}"));
        }
        assert!(names.len() < 1100, "{}", names.len());
        for (i, k) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(k, &names.get(&format!("kept-{i}"))));
        }
    }

    #[test]
    fn equal_label_sets_are_one_copy() {
        let mut sets = LabelSets::default();
        let set = |app: &str| -> weft_crds::Labels {
            Arc::new([("app".to_string(), app.to_string())].into())
        };
        let (mut first, mut second, mut other) = (set("web"), set("web"), set("db"));
        sets.share(&mut first);
        sets.share(&mut second);
        sets.share(&mut other);
        assert!(Arc::ptr_eq(&first, &second), "equal sets are one copy");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(sets.len(), 2);
    }
}
