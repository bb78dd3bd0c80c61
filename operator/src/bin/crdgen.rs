//! `crdgen`: prints the `NenCacheCluster` CRD as YAML (written to `crds/` by CI and checked
//! for drift by the operator's tests).

use kube::CustomResourceExt;
use nencache_operator::crd::NenCacheCluster;

fn main() {
    match serde_yaml_ng::to_string(&NenCacheCluster::crd()) {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::exit(1);
        }
    }
}
