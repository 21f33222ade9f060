package kubetest

import "syscall"

// dieWithParent makes the kernel kill the servers if the test binary dies
// without running Stop (a panic, a timeout), so they do not linger.
func dieWithParent() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
