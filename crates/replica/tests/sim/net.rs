//! The in-memory network between the nodes of one group.
//!
//! Every message is a packet with a round from which it may be delivered:
//! most are deliverable at once, some are held a few rounds, a few for a
//! long time (long enough to outlive a leader change). Each round a bounded
//! number of deliverable packets is picked at random (reordering). A packet
//! may be dropped, and a delivered one may be delivered again later (a
//! re-queued copy with its own delay).
//!
//! Partitions are per ordered pair of nodes: a link `a -> b` is either up or
//! cut, and a packet is lost if its link is cut when it would be delivered
//! (a partition loses what is in flight on it, like a reset connection).

use std::collections::BTreeSet;

use trireme_replica::raft::eraftpb::Message;

use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partition {
    /// One node cut off from all others, both ways.
    Isolate(u64),
    /// `from`'s messages to `to` are lost; `to -> from` is fine.
    OneWay { from: u64, to: u64 },
    /// Jepsen's bridge: `left` and `right` cannot talk to each other, and
    /// `bridge` talks to everyone.
    Bridge {
        bridge: u64,
        left: Vec<u64>,
        right: Vec<u64>,
    },
    /// A random minority cut off from the majority, both ways.
    Split { minority: Vec<u64> },
}

impl Partition {
    /// A random partition of one of the four kinds over `ids`.
    pub fn random(rng: &mut Rng, ids: &[u64]) -> Partition {
        let mut shuffled = ids.to_vec();
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rng.below(i as u64 + 1) as usize);
        }
        match rng.below(4) {
            0 => Partition::Isolate(shuffled[0]),
            1 => Partition::OneWay {
                from: shuffled[0],
                to: shuffled[1],
            },
            2 => {
                let rest = &shuffled[1..];
                let half = rest.len() / 2;
                Partition::Bridge {
                    bridge: shuffled[0],
                    left: rest[..half].to_vec(),
                    right: rest[half..].to_vec(),
                }
            }
            _ => {
                let size = rng.range(1, (ids.len() as u64 - 1) / 2) as usize;
                Partition::Split {
                    minority: shuffled[..size].to_vec(),
                }
            }
        }
    }

    /// The ordered pairs (from, to) whose link it cuts.
    fn cut_links(&self, ids: &[u64]) -> BTreeSet<(u64, u64)> {
        let both_ways = |a: &[u64], b: &[u64]| -> BTreeSet<(u64, u64)> {
            a.iter()
                .flat_map(|x| b.iter().flat_map(move |y| [(*x, *y), (*y, *x)]))
                .collect()
        };
        match self {
            Partition::Isolate(id) => {
                let others: Vec<u64> = ids.iter().copied().filter(|x| x != id).collect();
                both_ways(&[*id], &others)
            }
            Partition::OneWay { from, to } => [(*from, *to)].into_iter().collect(),
            Partition::Bridge { left, right, .. } => both_ways(left, right),
            Partition::Split { minority } => {
                let majority: Vec<u64> = ids.iter().copied().filter(|x| !minority.contains(x)).collect();
                both_ways(minority, &majority)
            }
        }
    }
}

pub struct Packet {
    pub from: u64,
    pub to: u64,
    pub msg: Message,
    deliver_at: u64,
}

/// Per-seed fault rates of the network.
#[derive(Debug, Clone, Copy)]
pub struct NetFaults {
    pub drop_percent: u64,
    pub dup_percent: u64,
    pub delay_percent: u64,
    /// Long delays, in basis points of messages sent.
    pub long_delay_bp: u64,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub lost_to_partitions: u64,
    pub duplicated: u64,
    pub delayed: u64,
    pub delayed_long: u64,
}

pub struct Network {
    ids: Vec<u64>,
    packets: Vec<Packet>,
    cut: BTreeSet<(u64, u64)>,
    /// The partition in force and the round it heals at.
    pub partition: Option<(Partition, u64)>,
    pub faults: NetFaults,
    /// Off while the group settles at the end of a run.
    pub faults_on: bool,
    pub stats: NetStats,
}

impl Network {
    pub fn new(ids: &[u64], faults: NetFaults) -> Network {
        Network {
            ids: ids.to_vec(),
            packets: Vec::new(),
            cut: BTreeSet::new(),
            partition: None,
            faults,
            faults_on: true,
            stats: NetStats::default(),
        }
    }

    pub fn link_up(&self, from: u64, to: u64) -> bool {
        !self.cut.contains(&(from, to))
    }

    pub fn partition(&mut self, p: Partition, heal_round: u64) {
        self.cut = p.cut_links(&self.ids);
        self.partition = Some((p, heal_round));
    }

    pub fn heal(&mut self) {
        self.cut.clear();
        self.partition = None;
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    pub fn send(&mut self, from: u64, msg: Message, round: u64, rng: &mut Rng) {
        self.stats.sent += 1;
        let delay = self.delay(rng, false);
        self.packets.push(Packet {
            from,
            to: msg.to,
            msg,
            deliver_at: round + delay,
        });
    }

    fn delay(&mut self, rng: &mut Rng, dup: bool) -> u64 {
        if !self.faults_on {
            return 0;
        }
        if rng.chance_bp(self.faults.long_delay_bp) {
            if !dup {
                self.stats.delayed_long += 1;
            }
            return rng.range(30, 300);
        }
        if dup {
            return rng.range(1, 40);
        }
        if rng.chance(self.faults.delay_percent) {
            self.stats.delayed += 1;
            return rng.range(1, 6);
        }
        0
    }

    /// Takes up to `max` deliverable packets for nodes `receiving` in a
    /// random order, after drops and partitions; may re-queue copies.
    pub fn deliver(&mut self, round: u64, max: usize, rng: &mut Rng, receiving: impl Fn(u64) -> bool) -> Vec<Packet> {
        let mut ready: Vec<usize> = (0..self.packets.len())
            .filter(|&i| self.packets[i].deliver_at <= round && receiving(self.packets[i].to))
            .collect();
        let k = ready.len().min(max);
        for i in 0..k {
            let j = i + rng.below((ready.len() - i) as u64) as usize;
            ready.swap(i, j);
        }
        // ready[..k] is the delivery order; remove from the back of the
        // queue first, so swap_remove only moves packets not picked.
        let mut picked: Vec<(usize, usize)> = ready[..k].iter().enumerate().map(|(o, &i)| (i, o)).collect();
        picked.sort_unstable_by(|a, b| b.cmp(a));
        let mut taken: Vec<Option<Packet>> = (0..k).map(|_| None).collect();
        for (i, o) in picked {
            taken[o] = Some(self.packets.swap_remove(i));
        }
        let mut out = Vec::with_capacity(k);
        for p in taken.into_iter().flatten() {
            if !self.link_up(p.from, p.to) {
                self.stats.lost_to_partitions += 1;
                continue;
            }
            if self.faults_on && rng.chance(self.faults.drop_percent) {
                self.stats.dropped += 1;
                continue;
            }
            if self.faults_on && rng.chance(self.faults.dup_percent) {
                self.stats.duplicated += 1;
                let delay = self.delay(rng, true);
                self.packets.push(Packet {
                    from: p.from,
                    to: p.to,
                    msg: p.msg.clone(),
                    deliver_at: round + delay,
                });
            }
            self.stats.delivered += 1;
            out.push(p);
        }
        out
    }
}
