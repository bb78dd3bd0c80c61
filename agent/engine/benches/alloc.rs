//! Criterion benchmarks of the extent allocator: alloc/free pairs in a fragmented arena with
//! mixed extent sizes (KV chunks of 64 KiB to 16 MiB in 4 KiB pages), against a baseline that
//! only moves the same values through a pre-sized Vec (the floor for any bookkeeping).
//!
//! Run: `cargo bench -p nencache-engine --bench alloc`

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use nencache_engine::{alloc::ExtentAllocator, traces::Rng};

fn bench(c: &mut Criterion) {
    const PAGES: u32 = 1 << 18; // 1 GiB of 4 KiB pages
    let sizes = [16u32, 64, 256, 512, 4096];
    let mut g = c.benchmark_group("alloc");
    g.bench_function("extent_alloc_free_fragmented", |b| {
        let mut a = ExtentAllocator::new(PAGES);
        let mut rng = Rng::new(1);
        let mut live = Vec::with_capacity(4096);
        // Fill to about 70% with mixed sizes, then free every third: a fragmented arena.
        while a.free_pages() > PAGES / 10 * 3 {
            let s = sizes[rng.range(0, sizes.len())];
            if let Some(x) = a.alloc(s) {
                live.push(x);
            }
        }
        let mut i = 0;
        live.retain(|x| {
            i += 1;
            if i % 3 == 0 {
                a.free(*x);
                false
            } else {
                true
            }
        });
        b.iter(|| {
            let s = sizes[rng.range(0, sizes.len())];
            if let Some(x) = a.alloc(black_box(s)) {
                let victim = rng.range(0, live.len());
                let old = std::mem::replace(&mut live[victim], x);
                a.free(old);
            }
        });
    });
    g.bench_function("vec_swap_baseline", |b| {
        let mut rng = Rng::new(1);
        let mut live: Vec<u32> = (0..4096).collect();
        b.iter(|| {
            let s = sizes[rng.range(0, sizes.len())];
            let victim = rng.range(0, live.len());
            black_box(std::mem::replace(&mut live[victim], s));
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
