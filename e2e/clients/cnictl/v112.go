//go:build libcni112

package main

import (
	"context"
	"fmt"

	"github.com/containernetworking/cni/libcni"
)

func gc(context.Context, *libcni.CNIConfig, *libcni.NetworkConfigList, []string) error {
	return fmt.Errorf("libcni v1.1 has no GC")
}

func status(context.Context, *libcni.CNIConfig, *libcni.NetworkConfigList) error {
	return fmt.Errorf("libcni v1.1 has no STATUS")
}
