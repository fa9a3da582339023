// Command k8s is a multi-call binary for backdial's local test control plane.
//
// It bundles kube-apiserver, kube-controller-manager, kube-scheduler and kubectl
// from one k8s.io/kubernetes version. The component is chosen by the basename of
// argv[0] (build.sh creates symlinks named after each component) or, failing
// that, by the first argument:
//
//	kube-apiserver --etcd-servers=...           (via symlink)
//	k8s kube-apiserver --etcd-servers=...       (explicit)
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"

	// Registrations the upstream main packages perform through blank imports.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	_ "time/tzdata"
)

// servers maps a component name to the constructor of its cobra command.
var servers = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
}

func runKubectl(args []string) int {
	os.Args = args
	// Honour -v early, as upstream kubectl does, so that klog output during
	// command construction uses the requested verbosity.
	_, _ = logs.GlogSetter(kubectlcmd.GetLogVerbosity(args))
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err) // prints the error and exits non-zero
		return 1
	}
	return 0
}

func run(name string, args []string) (int, bool) {
	if name == "kubectl" {
		return runKubectl(args), true
	}
	newCommand, ok := servers[name]
	if !ok {
		return 0, false
	}
	os.Args = args
	return cli.Run(newCommand()), true
}

func usage() {
	names := []string{"kubectl"}
	for name := range servers {
		names = append(names, name)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: k8s {%s} [flags...]\n", strings.Join(names, "|"))
}

func main() {
	base := strings.TrimSuffix(filepath.Base(os.Args[0]), ".exe")
	if code, ok := run(base, os.Args); ok {
		os.Exit(code)
	}
	if len(os.Args) > 1 {
		if code, ok := run(os.Args[1], os.Args[1:]); ok {
			os.Exit(code)
		}
	}
	usage()
	os.Exit(2)
}
