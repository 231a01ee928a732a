//go:build !libcni112

package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func gc(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList, valid []string) error {
	args := &libcni.GCArgs{ValidAttachments: []types.GCAttachment{}}
	for _, v := range valid {
		id, ifname, ok := strings.Cut(v, "/")
		if !ok {
			return fmt.Errorf("valid attachment %q is not CONTAINER_ID/IFNAME", v)
		}
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: id, IfName: ifname})
	}
	return cni.GCNetworkList(ctx, list, args)
}

func status(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
	return cni.GetStatusNetworkList(ctx, list)
}
