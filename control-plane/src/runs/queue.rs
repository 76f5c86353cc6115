//! Which queued run starts next: at most `max_running` at once, at most
//! `max_per_owner` of one owner, first come first served within an owner, and
//! owners take turns, so one owner's hundred runs do not hold back another
//! owner's one.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub struct Queue {
    max_running: usize,
    max_per_owner: usize,
    /// Owners in the order they take turns; an owner joins at the back
    /// when it has something queued and is not already in line.
    turns: VecDeque<String>,
    waiting: HashMap<String, VecDeque<String>>,
    running: HashMap<String, usize>,
    running_total: usize,
}

impl Queue {
    pub fn new(max_running: usize, max_per_owner: usize) -> Self {
        Self {
            max_running: max_running.max(1),
            max_per_owner: max_per_owner.max(1),
            turns: VecDeque::new(),
            waiting: HashMap::new(),
            running: HashMap::new(),
            running_total: 0,
        }
    }

    pub fn push(&mut self, owner: &str, run_id: &str) {
        let q = self.waiting.entry(owner.to_string()).or_default();
        if q.iter().any(|r| r == run_id) {
            return;
        }
        q.push_back(run_id.to_string());
        if !self.turns.iter().any(|o| o == owner) {
            self.turns.push_back(owner.to_string());
        }
    }

    /// The next run to start, marked running; None when nothing may start.
    pub fn pop(&mut self) -> Option<(String, String)> {
        if self.running_total >= self.max_running {
            return None;
        }
        for _ in 0..self.turns.len() {
            let owner = self.turns.pop_front()?;
            let busy = self.running.get(&owner).copied().unwrap_or(0) >= self.max_per_owner;
            let next = if busy {
                None
            } else {
                self.waiting.get_mut(&owner).and_then(|q| q.pop_front())
            };
            let more = self.waiting.get(&owner).is_some_and(|q| !q.is_empty());
            if more {
                // Served or not, the owner goes to the back of the line.
                self.turns.push_back(owner.clone());
            } else {
                self.waiting.remove(&owner);
            }
            if let Some(run) = next {
                *self.running.entry(owner.clone()).or_default() += 1;
                self.running_total += 1;
                return Some((owner, run));
            }
        }
        None
    }

    /// A run of `owner` ended (or stopped): its slot is free.
    pub fn finished(&mut self, owner: &str) {
        if let Some(n) = self.running.get_mut(owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(owner);
            }
            self.running_total = self.running_total.saturating_sub(1);
        }
    }

    pub fn queued(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut Queue) -> Vec<String> {
        std::iter::from_fn(|| q.pop().map(|(_, r)| r)).collect()
    }

    #[test]
    fn owners_take_turns_and_each_owner_is_fifo() {
        let mut q = Queue::new(100, 100);
        for r in ["a1", "a2", "a3", "a4"] {
            q.push("a", r);
        }
        q.push("b", "b1");
        q.push("c", "c1");
        q.push("c", "c2");
        assert_eq!(drain(&mut q), ["a1", "b1", "c1", "a2", "c2", "a3", "a4"]);
        assert_eq!(q.queued(), 0);
    }

    #[test]
    fn limits_hold_and_free_slots_are_reused() {
        let mut q = Queue::new(2, 1);
        for r in ["a1", "a2"] {
            q.push("a", r);
        }
        q.push("b", "b1");
        q.push("c", "c1");
        // One per owner, two in all.
        assert_eq!(drain(&mut q), ["a1", "b1"]);
        q.finished("a");
        // c waited longer in line than a's second run.
        assert_eq!(drain(&mut q), ["c1"]);
        q.finished("b");
        assert_eq!(drain(&mut q), ["a2"]);
        // A duplicate push (a resumed run submitted again) is ignored.
        q.push("d", "d1");
        q.push("d", "d1");
        q.finished("c");
        assert_eq!(drain(&mut q), ["d1"]);
        assert_eq!(q.queued(), 0);
    }
}
