//! The session tables: sessions with their quotas, reservations (listed per session and in
//! deadline order) and leases (listed per session). Closing a session or reaping expired
//! reservations walks only these lists.

use super::{EntryState, PutItem, Reserved, SessionId, State, pages_for};
use crate::{
    alloc::Extent,
    error::{EngineError, Result},
    key::key_hash,
    slab::{self, NIL},
};

#[derive(Debug)]
pub(super) struct Reservation {
    pub(super) entry: u32,
    pub(super) staging: Extent,
    pub(super) session: SessionId,
    pub(super) deadline: u64,
    pub(super) committing: bool,
    /// The session's reservations (slab slots).
    pub(super) s_prev: u32,
    pub(super) s_next: u32,
    /// Every reservation, oldest first: deadline order.
    pub(super) f_prev: u32,
    pub(super) f_next: u32,
}

#[derive(Debug)]
pub(super) struct LeaseRec {
    pub(super) entry: u32,
    pub(super) session: SessionId,
    /// The session's leases (slab slots).
    pub(super) prev: u32,
    pub(super) next: u32,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Session {
    pub(super) nonce: u32,
    pub(super) leases: u32,
    pub(super) reservations: u32,
    pub(super) staging_pages: u64,
    pub(super) lease_head: u32,
    pub(super) res_head: u32,
}

impl State {
    /// The open session `session`.
    pub(super) fn session(&self, session: SessionId) -> Result<Session> {
        // Errors are built only on failure: an unused one would still be dropped.
        match self.open_index(session) {
            Some(i) => Ok(self.sessions[i].expect("open")),
            None => Err(EngineError::UnknownSession(session)),
        }
    }

    /// The table index of `session` if it is open (its nonce matches).
    pub(super) fn open_index(&self, session: SessionId) -> Option<usize> {
        let idx = slab::index(session) as usize;
        match self.sessions.get(idx) {
            Some(Some(s)) if u64::from(s.nonce) == session >> 32 => Some(idx),
            _ => None,
        }
    }

    pub(super) fn reserve_one(
        &mut self,
        session: SessionId,
        it: &PutItem<'_>,
        now: u64,
    ) -> Result<Reserved> {
        let page = self.page;
        let total = it.value_len + it.key.len() as u64 + it.metadata.len() as u64;
        let staging_pages = pages_for(it.value_len, page);
        let sidx = slab::index(session) as usize;
        let s = self.sessions[sidx].expect("checked by the caller");
        if s.reservations >= self.cfg.limits.max_reservations_per_session {
            return Err(EngineError::NoSpace {
                what: "reservations of this session",
            });
        }
        if s.staging_pages + u64::from(staging_pages) > self.staging_quota_pages {
            return Err(EngineError::NoSpace {
                what: "staging space of this session",
            });
        }
        if self.reservations.is_full() {
            return Err(EngineError::NoSpace {
                what: "reservation table",
            });
        }
        let Some(staging) = self.staging.alloc(staging_pages) else {
            return Err(EngineError::NoSpace {
                what: "staging area (too many puts in flight)",
            });
        };
        let extent = match self.make_room(pages_for(total, page), now) {
            Ok(x) => x,
            Err(e) => {
                self.staging.free(staging);
                return Err(e);
            }
        };
        let ttl = it
            .ttl
            .or(self.cfg.limits.default_ttl)
            .map_or(u64::MAX, |d| d.as_millis() as u64);
        let e = self.new_entry(
            key_hash(it.key, self.seed),
            extent,
            it.value_len,
            (it.key.len(), it.metadata.len()),
            ttl,
            EntryState::Reserved,
        );
        self.push_undo(e);
        let mut deadline = now + self.cfg.limits.reservation_timeout.as_millis() as u64;
        if self.newest_res != NIL {
            // Creation order stays deadline order, which the reaper relies on.
            deadline = deadline.max(self.reservations.at(self.newest_res).deadline);
        }
        let id = self
            .reservations
            .insert(Reservation {
                entry: e,
                staging,
                session,
                deadline,
                committing: false,
                s_prev: NIL,
                s_next: s.res_head,
                f_prev: self.newest_res,
                f_next: NIL,
            })
            .expect("checked not full");
        let r = slab::index(id);
        if s.res_head != NIL {
            self.reservations.at_mut(s.res_head).s_prev = r;
        }
        if self.newest_res == NIL {
            self.oldest_res = r;
        } else {
            self.reservations.at_mut(self.newest_res).f_next = r;
        }
        self.newest_res = r;
        let s = self.sessions[sidx].as_mut().expect("open");
        s.res_head = r;
        s.reservations += 1;
        s.staging_pages += u64::from(staging_pages);
        Ok(Reserved::Space {
            id,
            staging_offset: u64::from(staging.start) * page,
        })
    }

    /// Unlinks a reservation just removed from the slab from the deadline list and, if its
    /// session is still open, from the session's list and quotas.
    pub(super) fn unlink_reservation(&mut self, r: &Reservation) {
        let res = &mut self.reservations;
        if r.f_prev == NIL {
            self.oldest_res = r.f_next;
        } else {
            res.at_mut(r.f_prev).f_next = r.f_next;
        }
        if r.f_next == NIL {
            self.newest_res = r.f_prev;
        } else {
            res.at_mut(r.f_next).f_prev = r.f_prev;
        }
        // A closed session's reservations being committed are no longer in any list.
        let Some(idx) = self.open_index(r.session) else {
            return;
        };
        let s = self.sessions[idx].as_mut().expect("open");
        let res = &mut self.reservations;
        if r.s_prev == NIL {
            s.res_head = r.s_next;
        } else {
            res.at_mut(r.s_prev).s_next = r.s_next;
        }
        if r.s_next != NIL {
            res.at_mut(r.s_next).s_prev = r.s_prev;
        }
        s.reservations -= 1;
        s.staging_pages -= u64::from(r.staging.pages);
    }

    pub(super) fn abort_one(&mut self, id: u64) {
        let Some(r) = self.reservations.remove(id) else {
            return;
        };
        self.unlink_reservation(&r);
        self.staging.free(r.staging);
        self.drop_entry(r.entry);
    }

    pub(super) fn lease(&mut self, session: SessionId, e: u32) -> Result<u64> {
        let Some(idx) = self.open_index(session) else {
            return Err(EngineError::UnknownSession(session));
        };
        let s = self.sessions[idx].as_mut().expect("open");
        if s.leases >= self.cfg.limits.max_leases_per_session {
            return Err(EngineError::NoSpace {
                what: "leases of this session",
            });
        }
        let Some(id) = self.leases.insert(LeaseRec {
            entry: e,
            session,
            prev: NIL,
            next: s.lease_head,
        }) else {
            return Err(EngineError::NoSpace {
                what: "lease table",
            });
        };
        let l = slab::index(id);
        if s.lease_head != NIL {
            self.leases.at_mut(s.lease_head).prev = l;
        }
        s.lease_head = l;
        s.leases += 1;
        self.pin(e);
        Ok(id)
    }

    pub(super) fn release_one(&mut self, id: u64) {
        let Some(l) = self.leases.remove(id) else {
            return;
        };
        if let Some(idx) = self.open_index(l.session) {
            let s = self.sessions[idx].as_mut().expect("open");
            if l.prev == NIL {
                s.lease_head = l.next;
            } else {
                self.leases.at_mut(l.prev).next = l.next;
            }
            if l.next != NIL {
                self.leases.at_mut(l.next).prev = l.prev;
            }
            s.leases -= 1;
        }
        self.unpin(l.entry, true);
    }
}
