# The rig's names and addresses, in one place: the Vagrantfile builds the machines from
# them and hands them to the provisioning scripts as environment variables.
# Documentation ranges only (RFC 5737, RFC 3849). The two libvirt networks get a bridge in
# the machine's own namespace, so their prefixes are routes there: they stay small and
# clear of 203.0.113.80, which this kind of machine uses to reach its package registries.
module Rig
  MGMT_NET = "203.0.113.128/25" # Vagrant's SSH network, isolated
  MAIL_NETMASK = "255.255.255.224" # the mail network: 203.0.113.0/27
  MGMT_BRIDGE = "nsrig-mgmt0"
  MAIL_PREFIX6 = 64 # 2001:db8:113::/64 on the mail network, set up by provisioning

  MACHINES = {
    "hosting" => { name: "abc.test", ipv4: "203.0.113.10", ipv6: "2001:db8:113::10" },
    "mx" => { name: "mx.test", ipv4: "203.0.113.25", ipv6: "2001:db8:113::25" },
  }.freeze

  # Behind hosting's bridge nsbr0; the mx routes these networks via hosting.
  TENANT_NET4 = "198.51.100.0/24"
  TENANT_NET6 = "2001:db8:51::/64"
  BRIDGE_V4 = "198.51.100.1"
  BRIDGE_V6 = "2001:db8:51::1"
  TENANTS = [
    { domain: "bcd.test", ipv4: "198.51.100.70", ipv6: "2001:db8:51::70" },
    { domain: "cde.test", ipv4: "198.51.100.71", ipv6: nil },
    { domain: "def.test", ipv4: nil, ipv6: "2001:db8:51::72" }, # IPv6 only
  ].freeze
  RECIPIENT_DOMAIN = "rcpt.test"

  # Variables for the provisioning scripts; RIG_TENANTS is "domain,ipv4,ipv6 ...".
  def self.environment
    hosting, mx = MACHINES.fetch("hosting"), MACHINES.fetch("mx")
    {
      "RIG_HOST_NAME" => hosting[:name], "RIG_HOST_V4" => hosting[:ipv4],
      "RIG_HOST_V6" => hosting[:ipv6],
      "RIG_MX_NAME" => mx[:name], "RIG_MX_V4" => mx[:ipv4], "RIG_MX_V6" => mx[:ipv6],
      "RIG_PREFIX6" => MAIL_PREFIX6.to_s,
      "RIG_TENANT_NET4" => TENANT_NET4, "RIG_TENANT_NET6" => TENANT_NET6,
      "RIG_BRIDGE_V4" => BRIDGE_V4, "RIG_BRIDGE_V6" => BRIDGE_V6,
      "RIG_TENANTS" => TENANTS.map { |t| [t[:domain], t[:ipv4], t[:ipv6]].join(",") }.join(" "),
      "RIG_RCPT_DOMAIN" => RECIPIENT_DOMAIN,
    }
  end
end
