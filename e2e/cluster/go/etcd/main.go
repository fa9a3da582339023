// Command etcd runs the etcd server from go.etcd.io/etcd/server/v3.
//
// The published etcd server module has no main package of its own (the
// upstream binary lives in a module that uses local replace directives), so
// this wrapper calls etcdmain.Main with the process arguments.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
