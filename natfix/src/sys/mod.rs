//! The host and kernel as natfix finds them: privileges and kernel features,
//! network namespaces, interfaces, ethtool settings, and the `nft` tool.
//! Thin wrappers: no policy lives here.

pub mod bpf;
pub mod clock;
pub mod ethtool;
pub mod features;
pub mod hooks;
pub mod iface;
pub mod netns;
pub mod nft;
pub mod rtnl;
pub mod vxlan;
