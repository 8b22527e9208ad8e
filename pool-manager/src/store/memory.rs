//! The in-memory [`Store`]: the embedded default for one process.
//!
//! All state sits behind one mutex and every operation is one critical
//! section, so each is atomic exactly as a Lua script is in Redis; nothing
//! awaits while the lock is held. It is built for the hot path (a lease and
//! a release are a queue pop, two map operations and one ordered-set
//! operation each): ready sandboxes in a FIFO queue per template, leases in
//! a map keyed by a serial number, and lease expiries in an ordered set, so
//! a reap touches only the leases that lapsed.
//!
//! Semantics shared with the Redis store (the conformance suite checks
//! both): a lease is held while `now_ms < expires_at_ms` and a host is alive
//! while `now_ms` is before its heartbeat's end; a host that never sent a
//! heartbeat is dead. A sandbox already in the pool (ready, parked or
//! leased) is not added twice: `add_ready` and `park` of it change nothing.
//! `release` does not look at the clock: a lapsed lease that no reaper took
//! yet can still be released by its holder, and exactly one of the two gets
//! the sandbox. `renew` checks the holder and the lease's end before the
//! host, so only the holder learns that a host died. `lease_parked` leaves
//! a parked sandbox of a dead host parked (the host may only be late);
//! `evict_dead_hosts` removes it with the host, and also the ready and
//! parked sandboxes of hosts that never sent a heartbeat. A zero target is
//! no target: `counts` lists a template only with a non-zero target, a
//! ready or a leased sandbox.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

use super::{HostInfo, Lease, PoolSandbox, Store, StoreError, TemplateCounts};

/// The pool's state in this process's memory. See the module doc.
#[derive(Debug)]
pub struct MemoryStore {
    /// Random per store, so lease ids of two stores never match.
    lease_tag: u64,
    state: Mutex<State>,
}

// The maps use FxHash, several times faster than SipHash on short keys.
// Their keys are ids and names that thaw makes (sandbox, host and lease
// ids, template names), never strings a client chooses, so there is no
// hash flooding to defend against.
#[derive(Debug, Default)]
struct State {
    /// Per template: ready sandboxes and the leased count.
    templates: FxHashMap<String, TemplatePool>,
    /// Ids of every sandbox in the pool: ready, parked or leased.
    members: FxHashSet<String>,
    /// Leases by serial number (the tail of the lease id).
    leases: FxHashMap<u64, Held>,
    /// `(expires_at_ms, serial)` of every lease, soonest first.
    expiry: BTreeSet<(u64, u64)>,
    /// Parked sandboxes: owner → sandbox id → sandbox.
    parked: FxHashMap<String, FxHashMap<String, PoolSandbox>>,
    /// Registered hosts and the Unix millisecond their heartbeat ends.
    hosts: FxHashMap<String, (HostInfo, u64)>,
    /// Targets per template (no entry for zero).
    targets: HashMap<String, u64>,
    /// Locks: name → (owner, held until).
    locks: HashMap<String, (String, u64)>,
    /// The next lease's serial number.
    next_serial: u64,
}

/// One template's pool.
#[derive(Debug, Default)]
struct TemplatePool {
    /// Ready sandboxes, oldest at the front.
    ready: VecDeque<PoolSandbox>,
    /// Sandboxes of this template leased now.
    leased: u64,
}

/// A lease as stored (its id is made from the store's tag and the serial).
#[derive(Debug)]
struct Held {
    sandbox: PoolSandbox,
    holder: String,
    expires_at_ms: u64,
}

impl State {
    fn host_alive(&self, host_id: &str, now_ms: u64) -> bool {
        self.hosts
            .get(host_id)
            .is_some_and(|&(_, until)| now_ms < until)
    }

    /// Records a lease of `sandbox` (already counted in `members` and in
    /// its template's `leased`).
    fn grant(&mut self, tag: u64, sandbox: PoolSandbox, holder: &str, expires_at_ms: u64) -> Lease {
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        let lease = Lease {
            lease_id: lease_id(tag, serial),
            sandbox: sandbox.clone(),
            holder: holder.to_owned(),
            expires_at_ms,
        };
        self.expiry.insert((expires_at_ms, serial));
        self.leases.insert(
            serial,
            Held {
                sandbox,
                holder: holder.to_owned(),
                expires_at_ms,
            },
        );
        lease
    }

    /// Forgets the lease `serial`, its expiry and its sandbox's membership.
    fn end(&mut self, serial: u64) -> Option<Held> {
        let held = self.leases.remove(&serial)?;
        self.expiry.remove(&(held.expires_at_ms, serial));
        self.members.remove(&held.sandbox.sandbox_id);
        if let Some(pool) = self.templates.get_mut(&held.sandbox.template) {
            pool.leased = pool.leased.saturating_sub(1);
        }
        Some(held)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `lease_` and 32 hex digits: the store's tag, then the serial.
fn lease_id(tag: u64, serial: u64) -> String {
    let mut id = Vec::with_capacity(38);
    id.extend_from_slice(b"lease_");
    for word in [tag, serial] {
        // The mask keeps 4 bits: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        id.extend(
            (0..16)
                .rev()
                .map(|i| HEX[((word >> (i * 4)) & 0xf) as usize]),
        );
    }
    // Only ASCII went in.
    String::from_utf8(id).unwrap_or_default()
}

/// The (tag, serial) of a lease id made by [`lease_id`].
fn parse_lease_id(id: &str) -> Option<(u64, u64)> {
    let hex = id.strip_prefix("lease_")?.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let word = |digits: &[u8]| {
        digits.iter().try_fold(0u64, |acc, &d| {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                _ => return None,
            };
            Some(acc << 4 | u64::from(v))
        })
    };
    Some((word(&hex[..16])?, word(&hex[16..])?))
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty pool.
    pub fn new() -> MemoryStore {
        MemoryStore {
            lease_tag: rand::random(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No operation panics half-way through a change, so a poisoned lock
        // (a panic elsewhere while it was held) still guards a whole state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The serial number inside a lease id this store issued.
    fn serial(&self, lease_id: &str) -> Option<u64> {
        match parse_lease_id(lease_id)? {
            (tag, serial) if tag == self.lease_tag => Some(serial),
            _ => None,
        }
    }
}

fn expiry(now_ms: u64, ttl: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

impl Store for MemoryStore {
    async fn add_ready(&self, sb: &PoolSandbox) -> Result<(), StoreError> {
        let mut st = self.lock();
        if st.members.contains(&sb.sandbox_id) {
            return Ok(());
        }
        st.members.insert(sb.sandbox_id.clone());
        match st.templates.get_mut(&sb.template) {
            Some(pool) => pool.ready.push_back(sb.clone()),
            None => {
                let pool = TemplatePool {
                    ready: VecDeque::from([sb.clone()]),
                    leased: 0,
                };
                st.templates.insert(sb.template.clone(), pool);
            }
        }
        Ok(())
    }

    async fn lease(
        &self,
        template: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<Option<Lease>, StoreError> {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(pool) = st.templates.get_mut(template) else {
            return Ok(None);
        };
        while let Some(sb) = pool.ready.pop_front() {
            let alive = st
                .hosts
                .get(&sb.host_id)
                .is_some_and(|&(_, until)| now_ms < until);
            if alive {
                pool.leased += 1;
                let expires_at_ms = expiry(now_ms, ttl);
                return Ok(Some(st.grant(self.lease_tag, sb, holder, expires_at_ms)));
            }
            // Its host is gone, and so is the sandbox: drop it.
            st.members.remove(&sb.sandbox_id);
        }
        Ok(None)
    }

    async fn renew(
        &self,
        lease_id: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<Lease, StoreError> {
        let not_held = || StoreError::LeaseNotHeld(lease_id.to_owned());
        let serial = self.serial(lease_id).ok_or_else(not_held)?;
        let mut st = self.lock();
        let st = &mut *st;
        let held = st.leases.get_mut(&serial).ok_or_else(not_held)?;
        if held.holder != holder || held.expires_at_ms <= now_ms {
            return Err(not_held());
        }
        let alive = st
            .hosts
            .get(&held.sandbox.host_id)
            .is_some_and(|&(_, until)| now_ms < until);
        if !alive {
            return Err(StoreError::HostDead {
                lease_id: lease_id.to_owned(),
                host_id: held.sandbox.host_id.clone(),
            });
        }
        let expires_at_ms = expiry(now_ms, ttl);
        st.expiry.remove(&(held.expires_at_ms, serial));
        st.expiry.insert((expires_at_ms, serial));
        held.expires_at_ms = expires_at_ms;
        Ok(Lease {
            lease_id: lease_id.to_owned(),
            sandbox: held.sandbox.clone(),
            holder: held.holder.clone(),
            expires_at_ms,
        })
    }

    async fn release(&self, lease_id: &str, holder: &str) -> Result<PoolSandbox, StoreError> {
        let not_held = || StoreError::LeaseNotHeld(lease_id.to_owned());
        let serial = self.serial(lease_id).ok_or_else(not_held)?;
        let mut st = self.lock();
        match st.leases.get(&serial) {
            Some(held) if held.holder == holder => {}
            _ => return Err(not_held()),
        }
        st.end(serial).map(|held| held.sandbox).ok_or_else(not_held)
    }

    async fn park(&self, owner: &str, sb: &PoolSandbox) -> Result<(), StoreError> {
        let mut st = self.lock();
        if !st.members.insert(sb.sandbox_id.clone()) {
            return Ok(());
        }
        st.parked
            .entry(owner.to_owned())
            .or_default()
            .insert(sb.sandbox_id.clone(), sb.clone());
        Ok(())
    }

    async fn lease_parked(
        &self,
        owner: &str,
        sandbox_id: &str,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<Option<Lease>, StoreError> {
        let mut st = self.lock();
        let host_id = match st.parked.get(owner).and_then(|m| m.get(sandbox_id)) {
            Some(sb) => sb.host_id.clone(),
            None => return Ok(None),
        };
        // A parked sandbox of a dead host stays parked: the host may only be
        // late, and if it is gone `evict_dead_hosts` reports the sandbox.
        if !st.host_alive(&host_id, now_ms) {
            return Ok(None);
        }
        let Some(owned) = st.parked.get_mut(owner) else {
            return Ok(None);
        };
        let Some(sb) = owned.remove(sandbox_id) else {
            return Ok(None);
        };
        if owned.is_empty() {
            st.parked.remove(owner);
        }
        st.templates.entry(sb.template.clone()).or_default().leased += 1;
        Ok(Some(st.grant(
            self.lease_tag,
            sb,
            holder,
            expiry(now_ms, ttl),
        )))
    }

    async fn reap_expired(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, StoreError> {
        let mut st = self.lock();
        let lapsed: Vec<u64> = st
            .expiry
            .iter()
            .take_while(|&&(expires, _)| expires <= now_ms)
            .take(max)
            .map(|&(_, serial)| serial)
            .collect();
        Ok(lapsed
            .into_iter()
            .filter_map(|serial| {
                st.end(serial).map(|held| Lease {
                    lease_id: lease_id(self.lease_tag, serial),
                    sandbox: held.sandbox,
                    holder: held.holder,
                    expires_at_ms: held.expires_at_ms,
                })
            })
            .collect())
    }

    async fn heartbeat(
        &self,
        host: &HostInfo,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut st = self.lock();
        st.hosts
            .insert(host.host_id.clone(), (host.clone(), expiry(now_ms, ttl)));
        Ok(())
    }

    async fn hosts(&self, now_ms: u64) -> Result<Vec<HostInfo>, StoreError> {
        let st = self.lock();
        let mut alive: Vec<HostInfo> = st
            .hosts
            .values()
            .filter(|&&(_, until)| now_ms < until)
            .map(|(h, _)| h.clone())
            .collect();
        alive.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        Ok(alive)
    }

    async fn evict_dead_hosts(&self, now_ms: u64) -> Result<Vec<PoolSandbox>, StoreError> {
        let mut st = self.lock();
        let st = &mut *st;
        st.hosts.retain(|_, &mut (_, until)| now_ms < until);
        // What remains in `hosts` is alive: every sandbox on any other host
        // (dead just now, or never registered) leaves the pool.
        let hosts = &st.hosts;
        let alive = |sb: &PoolSandbox| hosts.contains_key(&sb.host_id);
        let mut removed = Vec::new();
        for pool in st.templates.values_mut() {
            pool.ready.retain(|sb| {
                let keep = alive(sb);
                if !keep {
                    removed.push(sb.clone());
                }
                keep
            });
        }
        st.templates
            .retain(|_, pool| !pool.ready.is_empty() || pool.leased > 0);
        for owned in st.parked.values_mut() {
            owned.retain(|_, sb| {
                let keep = alive(sb);
                if !keep {
                    removed.push(sb.clone());
                }
                keep
            });
        }
        st.parked.retain(|_, owned| !owned.is_empty());
        for sb in &removed {
            st.members.remove(&sb.sandbox_id);
        }
        Ok(removed)
    }

    async fn ready_on_host(&self, host_id: &str) -> Result<Vec<PoolSandbox>, StoreError> {
        let st = self.lock();
        Ok(st
            .templates
            .values()
            .flat_map(|pool| pool.ready.iter())
            .filter(|sb| sb.host_id == host_id)
            .cloned()
            .collect())
    }

    async fn set_target(&self, template: &str, target: u64) -> Result<(), StoreError> {
        let mut st = self.lock();
        if target == 0 {
            st.targets.remove(template);
        } else {
            st.targets.insert(template.to_owned(), target);
        }
        Ok(())
    }

    async fn counts(&self) -> Result<BTreeMap<String, TemplateCounts>, StoreError> {
        let st = self.lock();
        let mut out: BTreeMap<String, TemplateCounts> = BTreeMap::new();
        for (t, &target) in &st.targets {
            out.entry(t.clone()).or_default().target = target;
        }
        for (t, pool) in &st.templates {
            if !pool.ready.is_empty() || pool.leased > 0 {
                let c = out.entry(t.clone()).or_default();
                c.ready = pool.ready.len() as u64;
                c.leased = pool.leased;
            }
        }
        Ok(out)
    }

    async fn try_lock(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut st = self.lock();
        if let Some((held_by, until)) = st.locks.get(name) {
            if held_by != owner && now_ms < *until {
                return Ok(false);
            }
        }
        st.locks
            .insert(name.to_owned(), (owner.to_owned(), expiry(now_ms, ttl)));
        Ok(true)
    }

    async fn unlock(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        let mut st = self.lock();
        if st
            .locks
            .get(name)
            .is_some_and(|(held_by, _)| held_by == owner)
        {
            st.locks.remove(name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_round_trip() {
        for (tag, serial) in [(0, 0), (u64::MAX, 1), (0x0123_4567_89ab_cdef, u64::MAX)] {
            let id = lease_id(tag, serial);
            assert_eq!(id.len(), 38);
            assert_eq!(id, format!("lease_{tag:016x}{serial:016x}"));
            assert_eq!(parse_lease_id(&id), Some((tag, serial)));
        }
        for bad in [
            "",
            "lease_",
            "lease_0123",
            "sb_00000000000000000000000000000000",
            "lease_0000000000000000000000000000000G",
            "lease_0000000000000000000000000000000A",
        ] {
            assert_eq!(parse_lease_id(bad), None, "{bad}");
        }
    }
}
