//! Pure sharding: work items with expected durations become balanced shards. Longest item
//! first onto the least-loaded shard (LPT), ties broken by index, so the output is
//! deterministic. No IO, no proto.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// One item to place, with its expected duration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Name (unique within a call).
    pub name: String,
    /// Expected duration in milliseconds.
    pub expected_ms: u64,
}

/// A shard: the items' indices in the input, and the sum of their expected durations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Indices into the input slice, in the order they were placed.
    pub items: Vec<usize>,
    /// Sum of expected durations.
    pub expected_ms: u64,
}

/// How many shards: a fixed count, or as many as keep each near a target duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardCount {
    /// Exactly this many (fewer if there are fewer items): up to one shard per item.
    Fixed(u32),
    /// ceil(total / target), at least 1, at most [`MAX_DERIVED_SHARDS`].
    Target { target_ms: u64 },
}

/// Cap on the shards a target duration may derive; an explicit count is capped only by the
/// number of items (one shard, one action, per item).
pub const MAX_DERIVED_SHARDS: usize = 256;

/// The estimate for an item never seen: the median of the known durations, or `fallback_ms`.
pub fn estimate_ms(known: &[u64], fallback_ms: u64) -> u64 {
    if known.is_empty() {
        return fallback_ms;
    }
    let mut v = known.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// Groups `items` into shards.
pub fn shard(items: &[Item], count: ShardCount) -> Vec<Shard> {
    if items.is_empty() {
        return vec![];
    }
    let total: u64 = items.iter().map(|i| i.expected_ms).sum();
    let n = match count {
        ShardCount::Fixed(n) => n.max(1) as usize,
        ShardCount::Target { target_ms } => {
            (total.div_ceil(target_ms.max(1)).max(1) as usize).min(MAX_DERIVED_SHARDS)
        }
    }
    .min(items.len());
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|a, b| {
        items[*b]
            .expected_ms
            .cmp(&items[*a].expected_ms)
            .then_with(|| items[*a].name.cmp(&items[*b].name))
    });
    let mut shards = vec![
        Shard {
            items: vec![],
            expected_ms: 0
        };
        n
    ];
    // The least-loaded shard (lowest index on ties) on top: O(items log shards), so a job of
    // 10,000 steps in 10,000 shards is placed at once.
    let mut loads: BinaryHeap<Reverse<(u64, usize)>> = (0..n).map(|k| Reverse((0, k))).collect();
    for i in order {
        let Some(Reverse((load, target))) = loads.pop() else {
            break;
        };
        shards[target].items.push(i);
        shards[target].expected_ms += items[i].expected_ms;
        loads.push(Reverse((load + items[i].expected_ms, target)));
    }
    shards
}

/// The predicted makespan of shards run in parallel, one agent each.
pub fn makespan_ms(shards: &[Shard]) -> u64 {
    shards.iter().map(|s| s.expected_ms).max().unwrap_or(0)
}

/// The best any split into `n` shards could do: max(longest item, total / n).
pub fn lower_bound_ms(items: &[Item], n: usize) -> u64 {
    let total: u64 = items.iter().map(|i| i.expected_ms).sum();
    let longest = items.iter().map(|i| i.expected_ms).max().unwrap_or(0);
    longest.max(total.div_ceil(n.max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations (ms) shaped like a real Go module's test packages: a few slow, many quick.
    fn realistic() -> Vec<Item> {
        let ms = [
            41_200, 23_900, 12_400, 9_800, 7_700, 6_100, 5_300, 4_400, 3_900, 3_100, 2_800, 2_200,
            1_900, 1_700, 1_500, 1_200, 1_100, 900, 800, 700, 650, 500, 420, 380, 300, 250, 200,
            150, 120, 90, 60, 40,
        ];
        ms.iter()
            .enumerate()
            .map(|(i, ms)| Item {
                name: format!("k8s.io/utils/pkg{i:02}"),
                expected_ms: *ms,
            })
            .collect()
    }

    #[test]
    fn makespan_is_within_ten_percent_of_the_lower_bound() {
        let items = realistic();
        for n in [2, 3, 4, 6, 8] {
            let shards = shard(&items, ShardCount::Fixed(n));
            let (got, bound) = (makespan_ms(&shards), lower_bound_ms(&items, n as usize));
            assert!(
                got as f64 <= bound as f64 * 1.10,
                "n={n}: makespan {got} vs bound {bound}"
            );
            let mut all: Vec<usize> = shards.iter().flat_map(|s| s.items.clone()).collect();
            all.sort_unstable();
            assert_eq!(
                all,
                (0..items.len()).collect::<Vec<_>>(),
                "every item exactly once"
            );
        }
    }

    #[test]
    fn output_is_deterministic_and_matches_the_snapshot() {
        let items = realistic();
        let a = shard(&items, ShardCount::Fixed(4));
        assert_eq!(a, shard(&items, ShardCount::Fixed(4)));
        let sums: Vec<u64> = a.iter().map(|s| s.expected_ms).collect();
        assert_eq!(sums, vec![41_200, 31_540, 31_510, 31_510]);
        let placed: Vec<Vec<usize>> = a.iter().map(|s| s.items.clone()).collect();
        assert_eq!(
            format!("{placed:?}"),
            "[[0], [1, 10, 12, 16, 18, 21, 24, 26, 31], [2, 5, 7, 9, 11, 14, 19, 20, 25, 27, 30], \
             [3, 4, 6, 8, 13, 15, 17, 22, 23, 28, 29]]"
        );
    }

    #[test]
    fn target_duration_picks_the_count_and_ties_are_stable() {
        let items = realistic();
        let total: u64 = items.iter().map(|i| i.expected_ms).sum();
        let shards = shard(&items, ShardCount::Target { target_ms: 60_000 });
        assert_eq!(shards.len() as u64, total.div_ceil(60_000));
        let same: Vec<Item> = (0..5)
            .map(|i| Item {
                name: format!("p{i}"),
                expected_ms: 1_000,
            })
            .collect();
        let s = shard(&same, ShardCount::Fixed(2));
        assert_eq!(s[0].items, vec![0, 2, 4]);
        assert_eq!(s[1].items, vec![1, 3]);
        assert!(shard(&[], ShardCount::Fixed(3)).is_empty());
        assert_eq!(
            shard(&same, ShardCount::Fixed(50)).len(),
            5,
            "never more shards than items"
        );
        let many: Vec<Item> = (0..1_000)
            .map(|i| Item {
                name: format!("s{i:04}"),
                expected_ms: 10,
            })
            .collect();
        let one_each = shard(&many, ShardCount::Fixed(1_000));
        assert_eq!(
            one_each.len(),
            1_000,
            "an explicit count may reach one per item"
        );
        assert!(one_each.iter().all(|s| s.items.len() == 1));
        assert_eq!(
            shard(&many, ShardCount::Target { target_ms: 1 }).len(),
            MAX_DERIVED_SHARDS,
            "a derived count stays capped"
        );
    }

    #[test]
    fn unseen_items_get_the_median() {
        assert_eq!(estimate_ms(&[], 5_000), 5_000);
        assert_eq!(estimate_ms(&[100, 9_000, 300], 5_000), 300);
    }
}
