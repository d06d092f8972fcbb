//! What `bench load` measured, as values: the accounting of one run (every action assigned
//! once and acknowledged once), nearest-rank percentiles, each coordinator's figures summed
//! over its sessions, the tables side by side with their ratio, and the last line scripts
//! read. Pure: the CLI prints what these return.
use comfy_table::{presets, Table};
use std::path::PathBuf;
use std::time::Duration;

/// Nearest-rank percentile of sorted samples (zero when there are none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = (p * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

/// The latencies a run is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latencies {
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

impl Latencies {
    /// Of samples in any order.
    pub fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Self {
            p50: percentile(&sorted, 0.5),
            p99: percentile(&sorted, 0.99),
            p999: percentile(&sorted, 0.999),
            max: percentile(&sorted, 1.0),
        }
    }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The line scripts read: capacity, then the open-loop latencies, then what was lost.
pub fn last_line(capacity: f64, l: &Latencies, lost: u64) -> String {
    format!(
        "load: {capacity:.0} actions/s, p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms, lost {lost}",
        ms(l.p50),
        ms(l.p99),
        ms(l.p999),
        ms(l.max)
    )
}

/// The accounting of one run over the actions `base..base+n`: each must be assigned once and
/// acknowledged as recorded once.
#[derive(Debug)]
pub struct Tally {
    base: u64,
    assigned: Vec<u8>,
    accepted: Vec<u8>,
    accepted_total: u64,
    /// What went wrong (assigned or acknowledged twice, refused, not of this run).
    pub problems: Vec<String>,
}

impl Tally {
    /// For the actions `base..base+n`.
    pub fn new(base: u64, n: u64) -> Self {
        Self {
            base,
            assigned: vec![0; n as usize],
            accepted: vec![0; n as usize],
            accepted_total: 0,
            problems: Vec::new(),
        }
    }

    fn offset(&mut self, index: Option<u64>, what: &str) -> Option<usize> {
        let offset = index
            .and_then(|i| i.checked_sub(self.base))
            .filter(|o| (*o as usize) < self.assigned.len());
        if offset.is_none() {
            self.problems
                .push(format!("{what} of an action not in this run: {index:?}"));
        }
        offset.map(|o| o as usize)
    }

    /// An Assign arrived; the action's offset in the run when it is its first.
    pub fn assigned(&mut self, index: Option<u64>) -> Option<u64> {
        let o = self.offset(index, "an assign")?;
        self.assigned[o] = self.assigned[o].saturating_add(1);
        if self.assigned[o] > 1 {
            self.problems.push(format!(
                "action {} was assigned twice",
                self.base + o as u64
            ));
            return None;
        }
        Some(o as u64)
    }

    /// An Ack arrived; the action's offset in the run when it newly recorded its result.
    pub fn acked(
        &mut self,
        index: Option<u64>,
        action: &str,
        accepted: bool,
        reason: &str,
    ) -> Option<u64> {
        if !accepted {
            self.problems
                .push(format!("result refused: {action}: {reason}"));
            return None;
        }
        let o = self.offset(index, "an ack")?;
        self.accepted[o] = self.accepted[o].saturating_add(1);
        if self.accepted[o] > 1 {
            self.problems
                .push(format!("{action} was acknowledged twice"));
            return None;
        }
        self.accepted_total += 1;
        Some(o as u64)
    }

    /// Actions recorded so far.
    pub fn accepted(&self) -> u64 {
        self.accepted_total
    }

    /// Actions of the run not (yet) recorded.
    pub fn lost(&self) -> u64 {
        self.accepted.len() as u64 - self.accepted_total
    }
}

/// One closed-loop round of the capacity run.
#[derive(Debug, Clone)]
pub struct Round {
    pub actions: u64,
    /// First submit to last acknowledgement.
    pub took: Duration,
    pub lost: u64,
    /// The coordinator's VmRSS at the end of the round, and the highest sampled during it.
    pub rss_end: u64,
    pub rss_peak: u64,
}

impl Round {
    /// Completed actions per second.
    pub fn rate(&self) -> f64 {
        (self.actions - self.lost) as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// The open-loop run.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    /// Offered actions per second.
    pub rate: u32,
    pub actions: u64,
    /// Submit-to-Assign, from each action's scheduled send time.
    pub latencies: Vec<Duration>,
    pub lost: u64,
    pub rss_end: u64,
}

/// One coordinator process driven by one set of agents: its capacity rounds and open loop.
#[derive(Debug, Clone)]
pub struct Session {
    /// "new" or "baseline".
    pub label: &'static str,
    pub program: PathBuf,
    pub join_took: Duration,
    /// VmRSS with every agent connected, before any work.
    pub rss_idle: u64,
    pub rounds: Vec<Round>,
    /// The closed loop of one-action jobs that sets the default offered rate, if it ran.
    pub one_action: Option<Round>,
    pub open: Option<OpenLoop>,
    /// VmHWM at the end.
    pub hwm: u64,
    pub problems: Vec<String>,
}

/// One coordinator's figures over all its sessions.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Median completed actions per second over the capacity rounds.
    pub capacity: f64,
    /// Completed one-action jobs per second (closed loop), when it was measured.
    pub one_action: f64,
    pub rate: u32,
    pub latencies: Latencies,
    pub samples: usize,
    pub lost: u64,
    /// VmRSS after the first round and after the last, the worst over its sessions.
    pub rss_first: u64,
    pub rss_last: u64,
    pub hwm: u64,
    pub join_took: Duration,
}

impl Summary {
    /// Of the sessions labelled `label`; None when there are none.
    pub fn of(sessions: &[Session], label: &str) -> Option<Self> {
        let mine: Vec<&Session> = sessions.iter().filter(|s| s.label == label).collect();
        if mine.is_empty() {
            return None;
        }
        let mut rates: Vec<f64> = mine
            .iter()
            .flat_map(|s| s.rounds.iter().map(Round::rate))
            .collect();
        rates.sort_by(f64::total_cmp);
        let samples: Vec<Duration> = mine
            .iter()
            .filter_map(|s| s.open.as_ref())
            .flat_map(|o| o.latencies.iter().copied())
            .collect();
        let lost = mine
            .iter()
            .map(|s| {
                s.rounds.iter().map(|r| r.lost).sum::<u64>() + s.open.as_ref().map_or(0, |o| o.lost)
            })
            .sum();
        Some(Self {
            capacity: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            one_action: mine
                .iter()
                .find_map(|s| s.one_action.as_ref().map(Round::rate))
                .unwrap_or(0.0),
            rate: mine
                .iter()
                .find_map(|s| s.open.as_ref().map(|o| o.rate))
                .unwrap_or(0),
            latencies: Latencies::of(&samples),
            samples: samples.len(),
            lost,
            rss_first: mine
                .iter()
                .filter_map(|s| s.rounds.first().map(|r| r.rss_end))
                .max()
                .unwrap_or(0),
            rss_last: mine
                .iter()
                .filter_map(|s| s.rounds.last().map(|r| r.rss_end))
                .max()
                .unwrap_or(0),
            hwm: mine.iter().map(|s| s.hwm).max().unwrap_or(0),
            join_took: mine.iter().map(|s| s.join_took).max().unwrap_or_default(),
        })
    }
}

/// The ratio `a / b` to three significant digits, or "-" when `b` is zero.
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if b == 0.0 {
        "-".to_string()
    } else if r != 0.0 && r < 0.1 {
        format!("{r:.4}x")
    } else {
        format!("{r:.2}x")
    }
}

/// The figures of the new coordinator, and of the baseline beside them with the ratio.
pub fn summary_table(new: &Summary, baseline: Option<&Summary>) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_FULL_CONDENSED);
    let mut header = vec!["bench load", "new"];
    if baseline.is_some() {
        header.extend(["baseline", "new ÷ baseline"]);
    }
    table.set_header(header);
    type Figure = fn(&Summary) -> (String, f64);
    let rows: Vec<(&str, Figure)> = vec![
        ("capacity: completed actions/s (median round)", |s| {
            (format!("{:.0}", s.capacity), s.capacity)
        }),
        ("one-action jobs: completed/s (closed loop)", |s| {
            (format!("{:.0}", s.one_action), s.one_action)
        }),
        ("open loop: offered actions/s", |s| {
            (s.rate.to_string(), f64::from(s.rate))
        }),
        ("Submit → Assign p50 (ms)", |s| {
            (ms(s.latencies.p50), s.latencies.p50.as_secs_f64())
        }),
        ("Submit → Assign p99 (ms)", |s| {
            (ms(s.latencies.p99), s.latencies.p99.as_secs_f64())
        }),
        ("Submit → Assign p99.9 (ms)", |s| {
            (ms(s.latencies.p999), s.latencies.p999.as_secs_f64())
        }),
        ("Submit → Assign max (ms)", |s| {
            (ms(s.latencies.max), s.latencies.max.as_secs_f64())
        }),
        ("latency samples", |s| {
            (s.samples.to_string(), s.samples as f64)
        }),
        ("lost", |s| (s.lost.to_string(), s.lost as f64)),
        ("RSS after the first round", |s| {
            (mib(s.rss_first), s.rss_first as f64)
        }),
        ("RSS after the last round", |s| {
            (mib(s.rss_last), s.rss_last as f64)
        }),
        ("RSS last ÷ first round", |s| {
            let r = s.rss_last as f64 / (s.rss_first as f64).max(1.0);
            (format!("{r:.2}"), r)
        }),
        ("VmHWM", |s| (mib(s.hwm), s.hwm as f64)),
        ("joins (key, CSR, Join, TLS), slowest", |s| {
            (
                archfarm_client::farm::display::format_duration(s.join_took),
                s.join_took.as_secs_f64(),
            )
        }),
    ];
    for (name, figure) in rows {
        let (shown, value) = figure(new);
        let mut row = vec![name.to_string(), shown];
        if let Some(b) = baseline {
            let (b_shown, b_value) = figure(b);
            row.extend([b_shown, ratio(value, b_value)]);
        }
        table.add_row(row);
    }
    table
}

/// Each session's rounds: rate and memory after each, in the order they ran.
pub fn rounds_table(sessions: &[Session]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_header(vec![
            "session",
            "round",
            "actions/s",
            "lost",
            "RSS after",
            "RSS peak",
        ]);
    for (n, s) in sessions.iter().enumerate() {
        let name = format!("{} {} ({})", n + 1, s.label, s.program.display());
        table.add_row(vec![
            name.clone(),
            "idle".to_string(),
            "-".to_string(),
            "-".to_string(),
            mib(s.rss_idle),
            "-".to_string(),
        ]);
        for (i, r) in s.rounds.iter().enumerate() {
            table.add_row(vec![
                name.clone(),
                format!("capacity {}", i + 1),
                format!("{:.0}", r.rate()),
                r.lost.to_string(),
                mib(r.rss_end),
                mib(r.rss_peak),
            ]);
        }
        if let Some(o) = &s.open {
            table.add_row(vec![
                name.clone(),
                format!("open loop, {} at {}/s", o.actions, o.rate),
                "-".to_string(),
                o.lost.to_string(),
                mib(o.rss_end),
                "-".to_string(),
            ]);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: impl IntoIterator<Item = u64>) -> Vec<Duration> {
        v.into_iter().map(Duration::from_millis).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted = ms_list(1..=100);
        assert_eq!(percentile(&sorted, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&sorted, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&sorted, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        let thousand = ms_list(1..=1000);
        let l = Latencies::of(&thousand.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(
            (l.p50, l.p99, l.p999, l.max),
            (
                Duration::from_millis(500),
                Duration::from_millis(990),
                Duration::from_millis(999),
                Duration::from_millis(1000)
            )
        );
    }

    #[test]
    fn the_last_line_has_a_fixed_shape() {
        let l = Latencies {
            p50: Duration::from_micros(1_250),
            p99: Duration::from_micros(7_004),
            p999: Duration::from_millis(12),
            max: Duration::from_millis(31),
        };
        assert_eq!(
            last_line(5_432.6, &l, 0),
            "load: 5433 actions/s, p50 1.25 ms, p99 7.00 ms, p99.9 12.00 ms, max 31.00 ms, lost 0"
        );
    }

    #[test]
    fn a_tally_counts_each_action_once_and_names_what_went_wrong() {
        let mut t = Tally::new(100, 3);
        assert_eq!(t.assigned(Some(101)), Some(1));
        assert_eq!(t.assigned(Some(101)), None);
        assert_eq!(t.assigned(Some(7)), None);
        assert_eq!(t.acked(Some(101), "x", true, ""), Some(1));
        assert_eq!(t.acked(Some(101), "x", true, ""), None);
        assert_eq!(t.acked(Some(100), "y", false, "stale"), None);
        assert_eq!((t.accepted(), t.lost()), (1, 2));
        assert_eq!(t.problems.len(), 4, "{:?}", t.problems);
    }

    #[test]
    fn a_summary_takes_the_median_round_and_every_sample() {
        let round = |secs: u64| Round {
            actions: 1_000,
            took: Duration::from_secs(secs),
            lost: 0,
            rss_end: secs << 20,
            rss_peak: 0,
        };
        let session = |label, rounds, lat: Vec<Duration>| Session {
            label,
            program: PathBuf::from("c"),
            join_took: Duration::ZERO,
            rss_idle: 0,
            rounds,
            one_action: None,
            open: Some(OpenLoop {
                rate: 100,
                actions: lat.len() as u64,
                latencies: lat,
                lost: 1,
                rss_end: 0,
            }),
            hwm: 0,
            problems: vec![],
        };
        let sessions = vec![
            session("new", vec![round(1), round(2)], ms_list([1, 2])),
            session("baseline", vec![round(10)], ms_list([9])),
            session("new", vec![round(4)], ms_list([3, 4])),
        ];
        let s = Summary::of(&sessions, "new").unwrap();
        assert_eq!(s.capacity, 500.0);
        assert_eq!((s.samples, s.lost), (4, 2));
        assert_eq!(s.latencies.max, Duration::from_millis(4));
        assert_eq!((s.rss_first, s.rss_last), (4 << 20, 4 << 20));
        assert!(Summary::of(&sessions, "other").is_none());
        let b = Summary::of(&sessions, "baseline").unwrap();
        assert!(summary_table(&s, Some(&b)).to_string().contains("5.00x"));
    }
}
