// cnictl drives a CNI network configuration list through libcni, as a container runtime does:
// libcni reads the conflist, negotiates the version, caches results and invokes the plugins.
// It is built twice by e2e/clients/test.sh: against libcni v1.3.0 (go.mod; GC and STATUS) and
// against libcni v1.1.2 (go.libcni112.mod with the libcni112 build tag; the libcni of containerd
// 1.6/1.7 and podman 4, which knows neither GC nor STATUS).
//
//	cnictl [flags] add|check|del CONTAINER_ID NETNS [IFNAME]
//	cnictl [flags] gc [CONTAINER_ID/IFNAME...]   (the valid attachments)
//	cnictl [flags] status
//	cnictl [flags] version                       (the cniVersion libcni chose for the list)
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func main() {
	confDir := flag.String("conf-dir", "/etc/cni/net.d", "directory of the network configuration lists")
	binDir := flag.String("bin-dir", "/opt/cni/bin", "directory of the plugins")
	cacheDir := flag.String("cache-dir", "/var/lib/cni", "libcni's result cache")
	network := flag.String("network", "", "name of the network configuration list")
	capArgs := flag.String("cap-args", "", "capability arguments (runtimeConfig), a JSON object")
	cniArgs := flag.String("cni-args", "", "CNI_ARGS, K=V;K2=V2")
	flag.Parse()
	args := flag.Args()
	if len(args) < 1 || *network == "" {
		fail(fmt.Errorf("usage: cnictl -network NAME [flags] add|check|del|gc|status|version ..."))
	}
	list, err := libcni.LoadConfList(*confDir, *network)
	if err != nil {
		fail(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{*binDir}, *cacheDir, nil)
	ctx := context.Background()
	switch args[0] {
	case "version":
		fmt.Println(list.CNIVersion)
	case "add", "check", "del":
		if len(args) < 3 {
			fail(fmt.Errorf("%s needs CONTAINER_ID NETNS [IFNAME]", args[0]))
		}
		rt := &libcni.RuntimeConf{ContainerID: args[1], NetNS: args[2], IfName: "eth0"}
		if len(args) > 3 {
			rt.IfName = args[3]
		}
		if rt.NetNS != "" {
			if rt.NetNS, err = filepath.Abs(rt.NetNS); err != nil {
				fail(err)
			}
		}
		if *capArgs != "" {
			if err := json.Unmarshal([]byte(*capArgs), &rt.CapabilityArgs); err != nil {
				fail(fmt.Errorf("-cap-args: %w", err))
			}
		}
		if *cniArgs != "" {
			for _, kv := range strings.Split(*cniArgs, ";") {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					fail(fmt.Errorf("-cni-args: %q is not K=V", kv))
				}
				rt.Args = append(rt.Args, [2]string{k, v})
			}
		}
		switch args[0] {
		case "add":
			result, err := cni.AddNetworkList(ctx, list, rt)
			if err != nil {
				fail(err)
			}
			if err := result.Print(); err != nil {
				fail(err)
			}
		case "check":
			err = cni.CheckNetworkList(ctx, list, rt)
		case "del":
			err = cni.DelNetworkList(ctx, list, rt)
		}
		if err != nil {
			fail(err)
		}
	case "gc":
		if err := gc(ctx, cni, list, args[1:]); err != nil {
			fail(err)
		}
	case "status":
		if err := status(ctx, cni, list); err != nil {
			fail(err)
		}
	default:
		fail(fmt.Errorf("unknown command %q", args[0]))
	}
}

// fail prints the error, with the plugin's CNI error code when it answered one.
func fail(err error) {
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		fmt.Fprintf(os.Stderr, "code %d: %s\n", cniErr.Code, err)
		os.Exit(1)
	}
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
