//! Microsoft.Network, as far as VMs need it: each VM's network interface (`{vm}-nic`, the id its
//! `networkProfile` names) with one IP configuration in the VM's subnet. The fleet file describes no
//! networks: a VM's subnet is the one an alternate-location restore put it in, else `default` of its
//! resource group's `{rg}-vnet` ([`Vm::subnet_id`]). The virtual networks that exist are the ones
//! some VM's subnet lies in.

use super::http::{Reply, Request};
use super::state::{parse_resource_id, resource_id, same, SimState, Vm};
use axum::http::Method;
use serde_json::{json, Value};

const RG: &str = "subscriptions/{}/resourcegroups/{}/providers/microsoft.network";

pub fn route(state: &mut SimState, req: &Request) -> Option<Reply> {
    if let Some(c) = req.route(Method::GET, &format!("{RG}/networkinterfaces/{{}}")) {
        let vm = state.vms.iter().find(|vm| {
            same(&vm.nic_name(), &c[2])
                && same(&vm.resource_group, &c[1])
                && same(&vm.subscription, &c[0])
        });
        return Some(match vm {
            Some(vm) => Reply::ok(render_nic(vm)),
            None => Reply::not_found("Microsoft.Network/networkInterfaces", &c[2]),
        });
    }
    None
}

/// `(vnet id, location)` of a virtual network id, when some VM's subnet lies in it.
pub fn virtual_network(state: &SimState, vnet_id: &str) -> Option<(String, String)> {
    let vnet_id = vnet_id.trim_end_matches('/');
    state.vms.iter().find_map(|vm| {
        let subnet = vm.subnet_id();
        let (vnet, _) = split_subnet_id(&subnet)?;
        same(&vnet, vnet_id).then(|| (vnet, vm.location.clone()))
    })
}

/// `(vnet id, subnet name)` of `/subscriptions/…/virtualNetworks/{vnet}/subnets/{subnet}`.
pub fn split_subnet_id(subnet_id: &str) -> Option<(String, String)> {
    let trimmed = subnet_id.trim_end_matches('/');
    let (vnet, subnet) = trimmed.rsplit_once('/')?;
    let (vnet, keyword) = vnet.rsplit_once('/')?;
    let (_, _, kind, _) = parse_resource_id(vnet)?;
    let is_vnet = same(&kind, "Microsoft.Network/virtualNetworks");
    (is_vnet && same(keyword, "subnets") && !subnet.is_empty())
        .then(|| (vnet.to_string(), subnet.to_string()))
}

/// A deterministic private address for a VM (the simulator allocates no address space).
fn private_ip(vm: &Vm) -> String {
    let hash = vm
        .vm_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    format!("10.0.{}.{}", (hash >> 8) % 256, 4 + hash % 250)
}

fn mac_address(vm: &Vm) -> String {
    let hex: String = vm.vm_id.chars().filter(char::is_ascii_hexdigit).collect();
    let pairs: Vec<String> = hex
        .as_bytes()
        .chunks(2)
        .take(3)
        .map(|p| String::from_utf8_lossy(p).to_ascii_uppercase())
        .collect();
    format!("00-0D-3A-{}", pairs.join("-"))
}

pub fn render_nic(vm: &Vm) -> Value {
    let id = resource_id(
        &vm.subscription,
        &vm.resource_group,
        "Microsoft.Network/networkInterfaces",
        &vm.nic_name(),
    );
    let etag = format!("W/\"{}\"", vm.vm_id);
    json!({
        "name": vm.nic_name(), "id": id, "etag": etag, "type": "Microsoft.Network/networkInterfaces",
        "location": vm.location, "tags": {},
        "properties": {
            "provisioningState": "Succeeded",
            "resourceGuid": vm.vm_id,
            "ipConfigurations": [{
                "name": "ipconfig1", "id": format!("{id}/ipConfigurations/ipconfig1"), "etag": etag,
                "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
                "properties": {
                    "provisioningState": "Succeeded", "privateIPAddress": private_ip(vm),
                    "privateIPAllocationMethod": "Dynamic", "subnet": { "id": vm.subnet_id() },
                    "primary": true, "privateIPAddressVersion": "IPv4"
                }
            }],
            "dnsSettings": { "dnsServers": [], "appliedDnsServers": [] },
            "macAddress": mac_address(vm),
            "enableAcceleratedNetworking": false, "enableIPForwarding": false,
            "primary": true, "virtualMachine": { "id": vm.id() }, "nicType": "Standard"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_ids_split_into_vnet_and_subnet() {
        let vnet =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/net";
        assert_eq!(
            split_subnet_id(&format!("{vnet}/subnets/default")),
            Some((vnet.to_string(), "default".to_string()))
        );
        assert_eq!(split_subnet_id(vnet), None);
        assert_eq!(split_subnet_id(&format!("{vnet}/other/default")), None);
        assert_eq!(
            split_subnet_id(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/d/subnets/x"
            ),
            None
        );
    }
}
