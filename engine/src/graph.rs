//! The DAG of a pipeline (petgraph): a topological order that follows the file where
//! it can, the stages of a cycle when there is one, and renderings for `rlhf dag`.

use crate::check::{CheckedStage, Pipeline, Source};
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::{BTreeMap, BTreeSet};

fn build(stages: &[CheckedStage]) -> (DiGraph<usize, ()>, Vec<NodeIndex>) {
    let mut graph = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    let index: BTreeMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    for (i, stage) in stages.iter().enumerate() {
        for upstream in stage.upstream() {
            if let Some(&j) = index.get(upstream.as_str()) {
                graph.update_edge(nodes[j], nodes[i], ());
            }
        }
    }
    (graph, nodes)
}

/// Stages in dependency order; among stages that are ready at once, the one written
/// first in the file goes first. On a cycle, returns the stage names along it.
pub fn topological_order(stages: &[CheckedStage]) -> Result<Vec<CheckedStage>, Vec<String>> {
    let (graph, nodes) = build(stages);
    let mut indegree: Vec<usize> = nodes
        .iter()
        .map(|&n| graph.neighbors_directed(n, petgraph::Incoming).count())
        .collect();
    let mut ready: BTreeSet<usize> = (0..stages.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(stages.len());
    while let Some(i) = ready.pop_first() {
        order.push(stages[i].clone());
        for next in graph.neighbors_directed(nodes[i], petgraph::Outgoing) {
            let j = graph[next];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    if order.len() == stages.len() {
        return Ok(order);
    }
    Err(find_cycle(stages, &graph))
}

/// One cycle, as stage names in edge order, starting from the stage first in the file.
fn find_cycle(stages: &[CheckedStage], graph: &DiGraph<usize, ()>) -> Vec<String> {
    for component in tarjan_scc(graph) {
        let members: BTreeSet<usize> = component.iter().map(|&n| graph[n]).collect();
        let self_loop = component.len() == 1 && graph.contains_edge(component[0], component[0]);
        if component.len() < 2 && !self_loop {
            continue;
        }
        let start = *members.iter().next().unwrap_or(&0);
        // Walk inside the component until a stage repeats; the loop from its first
        // visit is a cycle.
        let mut path = vec![start];
        let mut current = start;
        loop {
            let node = graph.node_indices().find(|&n| graph[n] == current);
            let Some(node) = node else { break };
            let next = graph
                .neighbors_directed(node, petgraph::Outgoing)
                .map(|n| graph[n])
                .filter(|j| members.contains(j))
                .min();
            let Some(next) = next else { break };
            if let Some(pos) = path.iter().position(|&p| p == next) {
                return path[pos..]
                    .iter()
                    .map(|&i| stages[i].name.clone())
                    .collect();
            }
            path.push(next);
            current = next;
        }
    }
    Vec::new()
}

/// Edges as (from stage, to stage, label), label being the output read or "after".
pub fn edges(pipeline: &Pipeline) -> Vec<(String, String, String)> {
    let mut edges = Vec::new();
    for stage in &pipeline.stages {
        for input in &stage.inputs {
            if let Source::Stage {
                stage: from,
                output,
            } = &input.source
            {
                edges.push((
                    from.clone(),
                    stage.name.clone(),
                    format!("{output} → {}", input.name),
                ));
            }
        }
        for after in &stage.after {
            edges.push((after.clone(), stage.name.clone(), "after".to_string()));
        }
    }
    edges
}

pub fn render_text(pipeline: &Pipeline) -> String {
    let mut out = String::new();
    for stage in &pipeline.stages {
        let upstream: Vec<String> = stage.upstream().into_iter().collect();
        if upstream.is_empty() {
            out.push_str(&format!("{} ({})\n", stage.name, stage.kind));
        } else {
            out.push_str(&format!(
                "{} ({}) ← {}\n",
                stage.name,
                stage.kind,
                upstream.join(", ")
            ));
        }
    }
    out
}

pub fn render_dot(pipeline: &Pipeline) -> String {
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", pipeline.name);
    for stage in &pipeline.stages {
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n{}\", shape=box];\n",
            stage.name, stage.name, stage.kind
        ));
    }
    for (from, to, label) in edges(pipeline) {
        out.push_str(&format!("  \"{from}\" -> \"{to}\" [label=\"{label}\"];\n"));
    }
    out.push_str("}\n");
    out
}

pub fn render_mermaid(pipeline: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    for stage in &pipeline.stages {
        out.push_str(&format!(
            "  {}[\"{}<br/>{}\"]\n",
            stage.name, stage.name, stage.kind
        ));
    }
    for (from, to, label) in edges(pipeline) {
        out.push_str(&format!("  {from} -->|{label}| {to}\n"));
    }
    out
}
