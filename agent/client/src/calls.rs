//! The operations behind [`crate::Client`]'s methods, on one session: splitting into
//! requests, the pipelined put, and turning answers into values, slots and outcomes.

use std::{
    ops::Range,
    sync::Arc,
    time::{Duration, Instant},
};

use nencache_api::{
    frame::{Found, Request, ReserveItem, Response, op},
    v1,
};

use nencache_engine::{EngineError, MAX_KEY_LEN};

use crate::{
    ClientError, Put, PutOutcome, Slot, Value, checksum,
    session::{Held, Session, count, mismatched},
};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A request the client refuses before sending, with the code and words the agent would use.
fn invalid(e: &EngineError) -> ClientError {
    ClientError::Status(tonic::Status::invalid_argument(e.to_string()))
}

/// Checks keys against the agent's limits before they are encoded (a key longer than its
/// length field would otherwise wrap and be read as other fields).
pub(crate) fn check_keys(s: &Session, keys: &[&[u8]]) -> Result<()> {
    let max = match s.info.limits.max_key_len {
        0 => MAX_KEY_LEN,
        n => n as usize,
    }
    .min(usize::from(u16::MAX));
    match keys.iter().find(|k| k.is_empty() || k.len() > max) {
        Some(k) => Err(invalid(&EngineError::InvalidKey { len: k.len(), max })),
        None => Ok(()),
    }
}

/// Checks put items (key, metadata, value length) against the agent's limits.
pub(crate) fn check_items(s: &Session, items: &[ReserveItem<'_>]) -> Result<()> {
    let limits = &s.info.limits;
    let max_meta = match limits.max_metadata_len {
        0 => 4096,
        n => n as usize,
    }
    .min(usize::from(u16::MAX));
    let max_value = match limits.max_value_len {
        0 => u64::MAX,
        n => n,
    };
    for it in items {
        check_keys(s, &[it.key])?;
        if it.metadata.len() > max_meta {
            return Err(invalid(&EngineError::MetadataTooLarge {
                len: it.metadata.len(),
                max: max_meta,
            }));
        }
        if it.value_len > max_value {
            return Err(invalid(&EngineError::ValueTooLarge {
                len: it.value_len,
                max: max_value,
            }));
        }
    }
    Ok(())
}

/// Values written to staging before their commit is sent, when a batch is pipelined.
const PIPELINE_BYTES: usize = 2 << 20;

/// A TTL on the wire: milliseconds, at least 1, or 0 for the agent's default.
pub(crate) fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| t.as_millis().max(1) as u64)
}

/// `e` as the error of a batch of which `outcomes` is known: the error itself when nothing
/// was done, else a [`ClientError::PartialPut`].
pub(crate) fn partial(outcomes: Vec<Option<PutOutcome>>, e: ClientError) -> ClientError {
    if outcomes.iter().all(Option::is_none) {
        e
    } else {
        ClientError::PartialPut {
            outcomes,
            source: Box::new(e),
        }
    }
}

/// One round of a batch of puts or reserves: its items, and the staging pages they take.
pub(crate) struct Round {
    pub(crate) items: Range<usize>,
    pages: u64,
}

impl Round {
    /// Takes the round's share of the session's quota, waiting up to `wait` for it.
    /// A wait ends early, with [`ClientError::Disconnected`], when the session dies (the
    /// next attempt then runs on a new one).
    pub(crate) async fn hold(&self, s: &Session, wait: Option<Duration>) -> Result<Arc<Held>> {
        let held = tokio::select! {
            held = s.quota.acquire(self.items.len(), self.pages, wait) => held?,
            () = s.dead() => return Err(s.disconnected()),
        };
        Ok(Arc::new(held))
    }
}

/// The next round of a batch of puts or reserves, from item `start`: its reserve fits one
/// request, and its values fit what the session's quota has free now (at least one item,
/// which waits for its share if need be), so that calls sharing the session, or slots it
/// still holds, shrink a round instead of failing it.
pub(crate) fn next_round(s: &Session, items: &[ReserveItem<'_>], start: usize) -> Round {
    let q = &s.quota;
    let (free_items, free_pages) = q.available();
    let max_items = s.sizer.max_batch.min(free_items.max(1));
    let (mut end, mut bytes, mut pages) = (start, 0, 0u64);
    for it in &items[start..] {
        let size = s.sizer.reserve(it);
        let p = q.pages(it.value_len);
        if end > start
            && (end - start == max_items
                || bytes + size > s.sizer.budget
                || pages + p > free_pages.min(q.max_pages))
        {
            break;
        }
        bytes += size;
        pages += p;
        end += 1;
    }
    Round {
        items: start..end,
        pages,
    }
}

/// One reserve request, holding its share of the session's quota (`held`). The agent counts
/// a reservation until the abort of a dropped slot or of a cancelled call's answer reaches
/// it, a moment after the client has given the share back: a refusal for the session's own
/// quota is therefore retried, after sending what is queued, until `patience` runs out.
pub(crate) async fn reserve_patiently(
    s: &Arc<Session>,
    held: &Arc<Held>,
    items: &[ReserveItem<'_>],
    patience: Duration,
) -> Result<Vec<Option<Slot>>> {
    let until = Instant::now() + patience;
    let mut pause = Duration::from_micros(200);
    loop {
        match reserve(s, held, items).await {
            Err(ClientError::Status(st))
                if st.code() == tonic::Code::ResourceExhausted
                    && st.message().contains("of this session")
                    && Instant::now() < until =>
            {
                s.send_queued().await;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// One reserve request; slots are checked against the staging area.
pub(crate) async fn reserve(
    s: &Arc<Session>,
    held: &Arc<Held>,
    items: &[ReserveItem<'_>],
) -> Result<Vec<Option<Slot>>> {
    let sent = Instant::now();
    let resp = s.call(&Request::Reserve(items.to_vec()), None).await?;
    let Response::Reserve(granted) = resp else {
        return Err(mismatched(op::RESERVE));
    };
    // Slots are made for every grant first, so an error below aborts them all.
    let timeout = Duration::from_millis(s.info.limits.reservation_timeout_ms);
    let write_by = sent + timeout.saturating_sub((timeout / 4).min(Duration::from_secs(2)));
    let slots: Vec<Option<Slot>> = granted
        .iter()
        .zip(
            items
                .iter()
                .map(|i| i.value_len)
                .chain(std::iter::repeat(0)),
        )
        .map(|(g, len)| {
            g.map(|(id, offset)| Slot {
                session: s.clone(),
                id,
                offset: offset as usize,
                len: len as usize,
                write_by,
                armed: true,
                held: Some(held.clone()),
            })
        })
        .collect();
    count(op::RESERVE, slots.len(), items.len())?;
    if slots.iter().flatten().any(|slot| {
        slot.offset
            .checked_add(slot.len)
            .is_none_or(|end| end > s.staging_len())
    }) {
        return Err(ClientError::Protocol("staging slot out of bounds".into()));
    }
    Ok(slots)
}

/// One round of `put_many`: reserve, then write and commit in pipelined groups. Records the
/// outcome of each item in `outcomes` as it becomes known, so that a failure part-way leaves
/// there what was stored.
pub(crate) async fn put_round(
    s: &Arc<Session>,
    held: &Arc<Held>,
    items: &[ReserveItem<'_>],
    puts: &[Put<'_>],
    outcomes: &mut [Option<PutOutcome>],
) -> Result<()> {
    let patience = Duration::from_millis(s.info.limits.reservation_timeout_ms.max(1000));
    let slots = reserve_patiently(s, held, items, patience).await?;
    for (o, slot) in outcomes.iter_mut().zip(&slots) {
        if slot.is_none() {
            *o = Some(PutOutcome::Exists);
        }
    }
    let mut reserved: Vec<(usize, Slot, &[u8])> = Vec::with_capacity(slots.len());
    for (i, (slot, p)) in slots.into_iter().zip(puts).enumerate() {
        if let Some(slot) = slot {
            reserved.push((i, slot, p.value));
        }
    }
    let mut reserved = reserved.into_iter().peekable();
    let mut pending = Vec::new();
    let mut refused = None;
    while refused.is_none() && reserved.peek().is_some() {
        let (mut group, mut bytes, mut at) = (Vec::new(), 0, Vec::new());
        while let Some((i, slot, value)) =
            reserved.next_if(|_| bytes < PIPELINE_BYTES && group.len() < s.sizer.max_batch)
        {
            if let Err(e) = slot.write(0, value) {
                // This slot and every one not yet written are dropped, and so aborted.
                refused = Some(e);
                break;
            }
            let sum = s.verify.then(|| checksum(value));
            bytes += value.len();
            at.push(i);
            group.push((slot, sum));
        }
        if group.is_empty() {
            break;
        }
        let group: Vec<(u64, Option<u64>)> = group
            .into_iter()
            .map(|(slot, sum)| (slot.disarm(), sum))
            .collect();
        pending.push((at, s.call(&Request::Commit(group), None)));
        // Let the connection's writer send this commit now, so that the agent copies this
        // group while this task writes the next (on a current-thread runtime it would
        // otherwise wait for this task's next await).
        tokio::task::yield_now().await;
    }
    drop(reserved);
    // Every commit sent is awaited, even after a refusal, so that each outcome is known.
    for (at, p) in pending {
        match commit_outcomes(p.await, at.len()) {
            Ok(o) => {
                for (i, o) in at.into_iter().zip(o) {
                    outcomes[i] = Some(o);
                }
            }
            Err(e) => refused = refused.or(Some(e)),
        }
    }
    refused.map_or(Ok(()), Err)
}

pub(crate) fn commit_outcomes(r: Result<Response>, n: usize) -> Result<Vec<PutOutcome>> {
    let Response::Commit(done) = r? else {
        return Err(mismatched(op::COMMIT));
    };
    count(op::COMMIT, done.len(), n)?;
    Ok(done
        .into_iter()
        .map(|ok| {
            if ok {
                PutOutcome::Stored
            } else {
                PutOutcome::ChecksumMismatch
            }
        })
        .collect())
}

/// Consecutive runs of slots of one session (slots outlive a reconnect).
pub(crate) fn group_by_session(slots: Vec<Slot>) -> Vec<Vec<Slot>> {
    let mut out: Vec<Vec<Slot>> = Vec::new();
    for slot in slots {
        match out.last_mut() {
            Some(g) if Arc::ptr_eq(&g[0].session, &slot.session) => g.push(slot),
            _ => out.push(vec![slot]),
        }
    }
    out
}

/// A [`Value`] for a found item; its lease is returned when it is dropped.
pub(crate) fn value(s: &Arc<Session>, f: Found) -> Value {
    Value {
        session: s.clone(),
        offset: f.offset as usize,
        len: f.len as usize,
        lease: f.lease,
        metadata: f.metadata,
    }
}

pub(crate) async fn lookup_on(s: &Arc<Session>, keys: &[&[u8]]) -> Result<(usize, Vec<v1::Tier>)> {
    check_keys(s, keys)?;
    let mut tiers = Vec::new();
    for r in s.sizer.split(keys.iter().map(|k| s.sizer.key(k))) {
        let want = r.len();
        let Response::Lookup(t) = s.call(&Request::Lookup(keys[r].to_vec()), None).await? else {
            return Err(mismatched(op::LOOKUP));
        };
        if t.len() > want {
            return Err(ClientError::Protocol(format!(
                "lookup answered {} tiers for {want} keys",
                t.len()
            )));
        }
        let full = t.len() == want;
        tiers.extend(
            t.into_iter()
                .map(|t| v1::Tier::try_from(i32::from(t)).unwrap_or_default()),
        );
        if !full {
            break;
        }
    }
    Ok((tiers.len(), tiers))
}

pub(crate) async fn put_many_on(s: &Arc<Session>, puts: &[Put<'_>]) -> Result<Vec<PutOutcome>> {
    let items: Vec<ReserveItem<'_>> = puts
        .iter()
        .map(|p| ReserveItem {
            key: p.key,
            value_len: p.value.len() as u64,
            metadata: p.metadata,
            ttl_ms: ttl_ms(p.ttl),
            overwrite: false,
        })
        .collect();
    check_items(s, &items)?;
    let mut outcomes: Vec<Option<PutOutcome>> = vec![None; puts.len()];
    let mut start = 0;
    while start < items.len() {
        let round = next_round(s, &items, start);
        start = round.items.end;
        // Held until every commit of the round is answered. Other tasks' rounds give theirs
        // back within a round trip or two; slots the caller keeps may never: wait at most a
        // reservation timeout.
        let wait = Duration::from_millis(s.info.limits.reservation_timeout_ms.max(1000));
        let held = round
            .hold(s, Some(wait))
            .await
            .map_err(|e| partial(outcomes.clone(), e))?;
        let r = round.items;
        let r = put_round(
            s,
            &held,
            &items[r.clone()],
            &puts[r.clone()],
            &mut outcomes[r],
        )
        .await;
        drop(held);
        if let Err(e) = r {
            return Err(partial(outcomes, e));
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| ClientError::Protocol("a put has no outcome".into())))
        .collect()
}

pub(crate) async fn get_on(s: &Arc<Session>, keys: &[&[u8]]) -> Result<Vec<Option<Value>>> {
    check_keys(s, keys)?;
    let sizes: Vec<usize> = keys.iter().map(|k| s.sizer.key(k)).collect();
    let mut pending = Vec::new();
    for r in s.sizer.split(sizes.iter().copied()) {
        let used: usize = sizes[r.clone()].iter().sum();
        // Leases of dropped values ride along instead of a call of their own.
        let room = s.sizer.budget.saturating_sub(used) / s.sizer.id();
        let (ids, settle) = s.queues.take_releases(room.min(s.sizer.max_batch));
        let n = r.len();
        let call = s.call(&Request::Get(keys[r].to_vec(), ids.clone()), settle);
        pending.push((n, ids, call));
    }
    let mut out = Vec::with_capacity(keys.len());
    for (n, carried, p) in pending {
        let found = match p.await {
            Ok(Response::Get(found)) => found,
            Ok(_) => return Err(mismatched(op::GET)),
            Err(e) => {
                // The agent applies the releases a get carries unless it refused the get as
                // invalid, which did nothing: then they go again.
                if e.code() == Some(tonic::Code::InvalidArgument) {
                    for id in carried {
                        s.queues.push_release(id);
                    }
                }
                return Err(e);
            }
        };
        // Values first, so that an error below drops them all and so returns every lease.
        let values: Vec<Option<Value>> =
            found.into_iter().map(|f| f.map(|f| value(s, f))).collect();
        count(op::GET, values.len(), n)?;
        let arena = s.arena().len();
        if values
            .iter()
            .flatten()
            .any(|v| v.offset.checked_add(v.len).is_none_or(|end| end > arena))
        {
            return Err(ClientError::Protocol("value extent out of bounds".into()));
        }
        out.extend(values);
    }
    Ok(out)
}
