//! [`PackStrategy::Greedy`](super::PackStrategy::Greedy): whole trees that fit the budget, larger trees
//! split by a greedy DFS, deepest subtrees first.

use super::{Info, Item};
use crate::tree::TrajectoryTree;

/// Items of the greedy packer: every tree that fits the budget whole, the others split by
/// [`greedy_split`]; paths longer than the budget go to `oversized`.
pub(super) fn greedy_items(
    tree: &TrajectoryTree,
    info: &Info,
    budget: u64,
    items: &mut Vec<Item>,
    oversized: &mut Vec<u32>,
) {
    let mut stamp = vec![u32::MAX; tree.nodes().len()];
    let mut next_stamp = 0u32;
    for r in tree.roots() {
        if info.size[r as usize] <= budget {
            items.push(Item {
                leaves: tree.nodes()[r as usize].leaves.clone(),
                tokens: info.size[r as usize],
            });
        } else {
            greedy_split(
                tree,
                info,
                r,
                budget,
                &mut stamp,
                &mut next_stamp,
                items,
                oversized,
            );
        }
    }
}

/// Greedy split of the tree rooted at `root` (larger than the budget) into items of at most `budget`
/// tokens; paths longer than the budget go to `oversized`.
#[allow(clippy::too_many_arguments)]
fn greedy_split(
    tree: &TrajectoryTree,
    info: &Info,
    root: u32,
    budget: u64,
    stamp: &mut [u32],
    next_stamp: &mut u32,
    items: &mut Vec<Item>,
    oversized: &mut Vec<u32>,
) {
    let nodes = tree.nodes();
    // Leaf order: DFS, deepest child subtree first; paths ending at a node after its children.
    enum Step {
        Visit(u32),
        Emit(u32),
    }
    let mut order: Vec<u32> = Vec::new();
    let mut stack = vec![Step::Visit(root)];
    let mut kids: Vec<u32> = Vec::new();
    while let Some(step) = stack.pop() {
        match step {
            Step::Visit(u) => {
                stack.push(Step::Emit(u));
                kids.clear();
                kids.extend_from_slice(&nodes[u as usize].children);
                // Deepest subtree first (stable: input order on ties); pushed reversed so the first
                // child is popped first.
                kids.sort_by_key(|&c| std::cmp::Reverse(info.max_depth[c as usize]));
                stack.extend(kids.iter().rev().map(|&c| Step::Visit(c)));
            }
            Step::Emit(u) => order.extend_from_slice(info.ends(u)),
        }
    }
    let mut cur = *next_stamp;
    *next_stamp += 1;
    let mut cur_leaves: Vec<u32> = Vec::new();
    let mut cur_size = 0u64;
    let cost = |k: u32, cur: u32, stamp: &[u32]| -> u64 {
        let mut c = 0u64;
        let mut u = Some(tree.leaves()[k as usize].node);
        while let Some(x) = u {
            if stamp[x as usize] == cur {
                break;
            }
            c += nodes[x as usize].len() as u64;
            u = nodes[x as usize].parent;
        }
        c
    };
    for k in order {
        let len = tree.leaves()[k as usize].len as u64;
        if len > budget {
            oversized.push(k);
            continue;
        }
        let mut c = cost(k, cur, stamp);
        if cur_size + c > budget {
            items.push(Item {
                leaves: std::mem::take(&mut cur_leaves),
                tokens: cur_size,
            });
            cur = *next_stamp;
            *next_stamp += 1;
            cur_size = 0;
            c = len;
        }
        let mut u = Some(tree.leaves()[k as usize].node);
        while let Some(x) = u {
            if stamp[x as usize] == cur {
                break;
            }
            stamp[x as usize] = cur;
            u = nodes[x as usize].parent;
        }
        cur_size += c;
        cur_leaves.push(k);
    }
    if !cur_leaves.is_empty() {
        items.push(Item {
            leaves: cur_leaves,
            tokens: cur_size,
        });
    }
}
