//! First-fit decreasing bin packing of the packers' items (see the parent module).

/// First-fit decreasing bin packing: returns bins as lists of item indices. Items larger than the
/// capacity get a bin of their own. `O(n log n)` (a max segment tree finds the first bin that fits).
pub fn first_fit_decreasing(sizes: &[u64], capacity: u64) -> Vec<Vec<usize>> {
    let n = sizes.len();
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut width = 1;
    while width < n {
        width *= 2;
    }
    // Remaining capacity of bin b at seg[width + b]; unopened bins have the full capacity.
    let mut seg = vec![capacity; 2 * width];
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for i in idx {
        let s = sizes[i];
        if s > capacity {
            bins.push(vec![i]);
            // Consume one bin slot so unopened-bin indices stay aligned with `bins`.
            let b = bins.len() - 1;
            set(&mut seg, width, b, 0);
            continue;
        }
        // Leftmost bin with remaining >= s (exists: there are at least n bin slots).
        let mut node = 1;
        while node < width {
            node = if seg[2 * node] >= s {
                2 * node
            } else {
                2 * node + 1
            };
        }
        let b = node - width;
        if b == bins.len() {
            bins.push(Vec::new());
        }
        bins[b].push(i);
        let rem = seg[node] - s;
        set(&mut seg, width, b, rem);
    }
    bins
}

/// Sets bin `b`'s remaining capacity to `v` and updates the maxima above it.
fn set(seg: &mut [u64], width: usize, b: usize, v: u64) {
    let mut node = width + b;
    seg[node] = v;
    while node > 1 {
        node /= 2;
        seg[node] = seg[2 * node].max(seg[2 * node + 1]);
    }
}
