//! Deficit round robin by tokens between apps: each turn an app gets a quantum of tokens of
//! credit and is served while its credit covers the cost of its next piece of work, so over
//! time every busy app gets the same share of tokens whatever the size of its requests.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub struct Drr {
    quantum: u64,
    /// Apps in round-robin order (every app seen; idle ones are skipped).
    ring: VecDeque<String>,
    deficit: HashMap<String, u64>,
    /// The app at the front of the ring has had its quantum for this turn.
    fresh: bool,
}

impl Drr {
    pub fn new(quantum: u64) -> Self {
        Self {
            quantum: quantum.max(1),
            ring: VecDeque::new(),
            deficit: HashMap::new(),
            fresh: false,
        }
    }

    /// Picks which app is served next among those with work, `cost(app)` being the tokens
    /// its next piece of work takes (charged at once). `None` only if no app has work.
    pub fn pick(
        &mut self,
        has_work: impl Fn(&str) -> bool,
        cost: impl Fn(&str) -> u64,
    ) -> Option<String> {
        if !self.ring.iter().any(|a| has_work(a)) {
            return None;
        }
        loop {
            let app = self.ring.front()?.clone();
            if !has_work(&app) {
                // Credit only carries over while an app stays busy (classic DRR).
                self.deficit.insert(app, 0);
                self.next_turn();
                continue;
            }
            let d = self.deficit.entry(app.clone()).or_insert(0);
            if !self.fresh {
                *d += self.quantum;
                self.fresh = true;
            }
            let need = cost(&app).max(1);
            if *d >= need {
                *d -= need;
                return Some(app);
            }
            self.next_turn();
        }
    }

    fn next_turn(&mut self) {
        self.ring.rotate_left(1);
        self.fresh = false;
    }

    /// Makes sure `app` takes part (at the back of the ring).
    pub fn join(&mut self, app: &str) {
        if !self.ring.iter().any(|a| a == app) {
            self.ring.push_back(app.to_string());
        }
    }

    /// Forgets an app that has nothing queued or running.
    pub fn leave(&mut self, app: &str) {
        if self.ring.front().is_some_and(|a| a == app) {
            self.fresh = false;
        }
        self.ring.retain(|a| a != app);
        self.deficit.remove(app);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_and_large_requests_share_tokens_equally() {
        let mut d = Drr::new(32);
        d.join("big");
        d.join("small");
        let cost = |a: &str| if a == "big" { 256 } else { 16 };
        let mut served: HashMap<String, u64> = HashMap::new();
        for _ in 0..2000 {
            let a = d.pick(|_| true, cost).unwrap();
            *served.entry(a.clone()).or_default() += cost(&a);
        }
        let (b, s) = (served["big"] as f64, served["small"] as f64);
        assert!((b / s - 1.0).abs() < 0.05, "big {b} small {s}");
    }

    #[test]
    fn idle_apps_are_skipped_and_lose_credit() {
        let mut d = Drr::new(10);
        d.join("a");
        d.join("b");
        assert_eq!(d.pick(|a| a == "b", |_| 5).as_deref(), Some("b"));
        assert_eq!(d.pick(|_| false, |_| 5), None);
        d.leave("b");
        assert_eq!(d.pick(|a| a == "b", |_| 5), None);
    }

    proptest! {
        /// With every app always busy, no app's served tokens fall behind another's by more
        /// than one quantum plus one request.
        #[test]
        fn shares_stay_within_a_quantum(costs in proptest::collection::vec(1u64..300, 2..6),
                                        rounds in 50usize..400) {
            let quantum = 64;
            let mut d = Drr::new(quantum);
            let names: Vec<String> = (0..costs.len()).map(|i| format!("app{i}")).collect();
            for n in &names { d.join(n); }
            let cost_of = |a: &str| costs[a[3..].parse::<usize>().unwrap()];
            let mut served = vec![0u64; costs.len()];
            for _ in 0..rounds {
                let a = d.pick(|_| true, cost_of).unwrap();
                served[a[3..].parse::<usize>().unwrap()] += cost_of(&a);
            }
            let max_cost = *costs.iter().max().unwrap();
            let lo = *served.iter().min().unwrap();
            let hi = *served.iter().max().unwrap();
            prop_assert!(hi - lo <= 2 * (quantum + max_cost), "{served:?} costs {costs:?}");
        }
    }
}
