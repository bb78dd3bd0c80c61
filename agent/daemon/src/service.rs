//! The gRPC service: decodes `nencache.v1.NodeCache` calls into [`Ops`] (where each
//! operation's checks and limits live, shared with the fast path), records metrics, and maps
//! engine errors to gRPC status codes through [`crate::ops::status_of`].

use std::{sync::Arc, time::Instant};

use nencache_api::v1::{self, node_cache_server::NodeCache};
use nencache_engine::{Committed, PutItem, Reserved};
use tonic::{Code, Request, Response, Status};

use crate::{
    metrics::Metrics,
    ops::{Ops, put_item, status_of, tier},
};

/// Implementation of the node-local service over one engine (the default tenant).
#[derive(Debug, Clone)]
pub struct NodeCacheService {
    ops: Ops,
    metrics: Arc<Metrics>,
    attach_socket: String,
}

impl NodeCacheService {
    /// A service over `ops`, announcing `attach_socket` (a file name beside the gRPC socket).
    #[must_use]
    pub fn new(ops: Ops, metrics: Arc<Metrics>, attach_socket: String) -> Self {
        Self {
            ops,
            metrics,
            attach_socket,
        }
    }

    fn finish<T>(
        &self,
        method: &'static str,
        start: Instant,
        r: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let code = r.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics
            .observe(method, code, start.elapsed().as_secs_f64());
        if let Err(s) = &r {
            tracing::debug!(method, code = ?s.code(), message = s.message(), "call refused");
        }
        r.map(Response::new)
    }
}

fn keys(k: &[Vec<u8>]) -> Vec<&[u8]> {
    k.iter().map(Vec::as_slice).collect()
}

#[tonic::async_trait]
impl NodeCache for NodeCacheService {
    async fn handshake(
        &self,
        req: Request<v1::HandshakeRequest>,
    ) -> Result<Response<v1::HandshakeResponse>, Status> {
        let start = Instant::now();
        let r = self.ops.handshake(&req.into_inner(), &self.attach_socket);
        self.finish("handshake", start, r)
    }

    async fn lookup(
        &self,
        req: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = self
            .ops
            .lookup(&keys(&req.keys))
            .map_err(|e| status_of(&e))
            .map(|tiers| v1::LookupResponse {
                prefix_hits: tiers.len() as u32,
                tiers: tiers.into_iter().map(tier).collect(),
            });
        self.finish("lookup", start, r)
    }

    async fn reserve(
        &self,
        req: Request<v1::ReserveRequest>,
    ) -> Result<Response<v1::ReserveResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let items: Vec<PutItem<'_>> = req
            .items
            .iter()
            .map(|i| put_item(&i.key, i.value_len, &i.metadata, i.ttl_ms, i.overwrite))
            .collect();
        let r = self
            .ops
            .reserve(req.session, &items)
            .map_err(|e| status_of(&e))
            .map(|rs| v1::ReserveResponse {
                reservations: rs
                    .into_iter()
                    .map(|r| match r {
                        Reserved::Space { id, staging_offset } => v1::Reservation {
                            status: v1::ReserveStatus::Reserved as i32,
                            reservation_id: id,
                            staging_offset,
                        },
                        Reserved::Exists => v1::Reservation {
                            status: v1::ReserveStatus::Exists as i32,
                            ..Default::default()
                        },
                    })
                    .collect(),
            });
        self.finish("reserve", start, r)
    }

    async fn commit(
        &self,
        req: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let items: Vec<(u64, Option<u64>)> = req
            .items
            .iter()
            .map(|i| (i.reservation_id, i.checksum))
            .collect();
        let r = self
            .ops
            .commit(req.session, items)
            .await
            .map_err(|e| status_of(&e))
            .map(|cs| v1::CommitResponse {
                statuses: cs
                    .into_iter()
                    .map(|c| match c {
                        Committed::Done => v1::CommitStatus::Committed as i32,
                        Committed::ChecksumMismatch => v1::CommitStatus::ChecksumMismatch as i32,
                    })
                    .collect(),
            });
        self.finish("commit", start, r)
    }

    async fn abort(
        &self,
        req: Request<v1::AbortRequest>,
    ) -> Result<Response<v1::AbortResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = self
            .ops
            .abort(req.session, &req.reservation_ids)
            .map_err(|e| status_of(&e))
            .map(|()| v1::AbortResponse {});
        self.finish("abort", start, r)
    }

    async fn get(&self, req: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = self
            .ops
            .get(req.session, &keys(&req.keys), &[])
            .await
            .map_err(|e| status_of(&e))
            .map(|ls| v1::GetResponse {
                items: ls
                    .into_iter()
                    .map(|l| match l {
                        Some(l) => v1::GetItem {
                            found: true,
                            lease_id: l.id,
                            offset: l.offset,
                            len: l.len,
                            metadata: l.metadata,
                            tier: tier(l.tier),
                        },
                        None => v1::GetItem::default(),
                    })
                    .collect(),
            });
        self.finish("get", start, r)
    }

    async fn release(
        &self,
        req: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = self
            .ops
            .release(req.session, &req.lease_ids)
            .map_err(|e| status_of(&e))
            .map(|()| v1::ReleaseResponse {});
        self.finish("release", start, r)
    }

    async fn delete(
        &self,
        req: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = self
            .ops
            .delete(&keys(&req.keys))
            .map_err(|e| status_of(&e))
            .map(|n| v1::DeleteResponse { deleted: n as u32 });
        self.finish("delete", start, r)
    }

    async fn stats(
        &self,
        _req: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let start = Instant::now();
        let s = self.ops.engine().stats();
        let host = v1::TierStats {
            tier: v1::Tier::Host as i32,
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            entries: s.entries,
            evictions: s.evictions,
            hits: s.hits - s.promotions,
            ..v1::TierStats::default()
        };
        let lower = self
            .ops
            .engine()
            .tier_stats()
            .into_iter()
            .map(|t| v1::TierStats {
                tier: tier(t.tier),
                capacity_bytes: t.store.capacity_bytes,
                used_bytes: t.store.used_bytes,
                entries: t.store.entries,
                evictions: t.store.evictions,
                hits: t.hits,
                read_bytes: t.store.read_bytes,
                written_bytes: t.demoted_bytes,
                io_errors: t.store.io_errors,
                corrupt_entries: t.store.corrupt,
                degraded: t.degraded.unwrap_or_default(),
                io_engine: t.io_engine.into(),
            });
        let r = Ok(v1::StatsResponse {
            tiers: std::iter::once(host).chain(lower).collect(),
            promotions: s.promotions,
            demotions: s.demotions,
            evictions_unsaved: s.evictions_unsaved,
            hits: s.hits,
            misses: s.misses,
            lookup_keys: s.lookup_keys,
            lookup_hits: s.lookup_hits,
            commits: s.commits,
            expirations: s.expirations,
            deletes: s.deletes,
            leases: s.leases,
            reservations: s.reservations,
            sessions: s.sessions,
            reclaimed_leases: s.reclaimed_leases,
            reclaimed_reservations: s.reclaimed_reservations,
            checksum_failures: s.checksum_failures,
            no_space: s.no_space,
            staging_bytes: s.staging_bytes,
            staging_used_bytes: s.staging_used_bytes,
        });
        self.finish("stats", start, r)
    }
}
