//go:build !unix

package app

import "time"

// processCPU cannot tell here, and the parallelism stays the default.
func processCPU() (time.Duration, bool) { return 0, false }
