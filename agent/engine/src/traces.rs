//! Synthetic workloads: a Zipf key trace and an LLM chat workload in which users share
//! system prompts and grow their chat histories turn by turn. Used by the eviction-policy
//! comparison, the benchmark tool and the demo, so that all three speak of the same traffic.
//! Deterministic for a given seed.

use crate::key::ChunkKeys;

/// A small, fast, seeded PRNG (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf-distributed ranks over `0..n`.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// Ranks `0..n` with exponent `alpha` (rank 0 is the most popular).
    #[must_use]
    pub fn new(n: usize, alpha: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(alpha);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// Draws a rank.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// A trace of `len` keys drawn from `n` with Zipf exponent `alpha`, as 8-byte keys.
#[must_use]
pub fn zipf_trace(n: usize, alpha: f64, len: usize, seed: u64) -> Vec<[u8; 8]> {
    let z = Zipf::new(n, alpha);
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| (z.sample(&mut rng) as u64).to_le_bytes())
        .collect()
}

/// Shape of the chat workload.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Concurrent users.
    pub users: usize,
    /// Distinct system prompts (shared by users, Zipf-popular).
    pub system_prompts: usize,
    /// Tokens per system prompt.
    pub system_tokens: usize,
    /// Tokens a user adds per turn (range).
    pub user_tokens: (usize, usize),
    /// Tokens the model answers per turn (range).
    pub reply_tokens: (usize, usize),
    /// Turns before a user starts a new conversation (range).
    pub turns: (usize, usize),
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            users: 32,
            system_prompts: 6,
            system_tokens: 1024,
            user_tokens: (32, 384),
            reply_tokens: (64, 512),
            turns: (2, 10),
            chunk_size: 256,
            seed: 7,
        }
    }
}

#[derive(Debug, Clone)]
struct Conversation {
    tokens: Vec<u32>,
    turns_left: usize,
}

/// One request of the chat workload: the user's full prompt, cut into chunk keys.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// Which user sent it.
    pub user: usize,
    /// The prompt's tokens.
    pub tokens: usize,
    /// Keys of the prompt's full chunks, in order.
    pub keys: Vec<[u8; 16]>,
}

/// Generator of chat requests.
#[derive(Debug, Clone)]
pub struct ChatWorkload {
    cfg: ChatConfig,
    rng: Rng,
    prompts: Vec<Vec<u32>>,
    prompt_pick: Zipf,
    users: Vec<Conversation>,
    keys: ChunkKeys,
}

impl ChatWorkload {
    /// A workload for the given shape.
    #[must_use]
    pub fn new(cfg: ChatConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let prompts = (0..cfg.system_prompts)
            .map(|_| {
                (0..cfg.system_tokens)
                    .map(|_| rng.next_u64() as u32 % 128_000)
                    .collect()
            })
            .collect();
        let prompt_pick = Zipf::new(cfg.system_prompts, 1.0);
        let keys = ChunkKeys::new("nencache-demo/llama-3.1-8b@bf16@tp1", cfg.chunk_size);
        let mut w = Self {
            users: Vec::new(),
            rng,
            prompts,
            prompt_pick,
            keys,
            cfg,
        };
        w.users = (0..w.cfg.users).map(|_| w.new_conversation()).collect();
        w
    }

    fn new_conversation(&mut self) -> Conversation {
        let p = self.prompt_pick.sample(&mut self.rng);
        let turns = self.rng.range(self.cfg.turns.0, self.cfg.turns.1 + 1);
        Conversation {
            tokens: self.prompts[p].clone(),
            turns_left: turns,
        }
    }

    fn push_tokens(&mut self, user: usize, range: (usize, usize)) {
        let n = self.rng.range(range.0, range.1 + 1);
        for _ in 0..n {
            let t = self.rng.next_u64() as u32 % 128_000;
            self.users[user].tokens.push(t);
        }
    }

    /// The next request. The model's reply is appended to the user's history afterwards, so
    /// the user's next prompt extends this one.
    pub fn next_request(&mut self) -> ChatRequest {
        let user = self.rng.range(0, self.cfg.users);
        if self.users[user].turns_left == 0 {
            self.users[user] = self.new_conversation();
        }
        self.push_tokens(user, self.cfg.user_tokens);
        let conv = &self.users[user];
        let req = ChatRequest {
            user,
            tokens: conv.tokens.len(),
            keys: self.keys.keys(&conv.tokens),
        };
        self.push_tokens(user, self.cfg.reply_tokens);
        self.users[user].turns_left -= 1;
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_low_ranks() {
        let t = zipf_trace(1000, 1.0, 20_000, 1);
        let zeros = t.iter().filter(|k| u64::from_le_bytes(**k) == 0).count();
        let tail = t.iter().filter(|k| u64::from_le_bytes(**k) == 999).count();
        assert!(
            zeros > 100 * tail.max(1) / 10,
            "rank 0: {zeros}, rank 999: {tail}"
        );
    }

    #[test]
    fn chat_prompts_grow_and_share_system_prompts() {
        let mut w = ChatWorkload::new(ChatConfig {
            users: 1,
            turns: (3, 3),
            ..Default::default()
        });
        let a = w.next_request();
        let b = w.next_request();
        assert!(b.tokens > a.tokens);
        assert_eq!(a.keys[..], b.keys[..a.keys.len()]);
    }
}
