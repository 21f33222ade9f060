package app

import "errors"

// task is a long-running part of the server: run blocks until the task ends
// by itself or is stopped; stop makes run return soon. stop may be called
// before run has started and must be safe to call once after run returned.
type task struct {
	name string
	run  func() error
	stop func(error)
}

// errStopped is the cause a task's stop receives when another task ended.
var errStopped = errors.New("stopped")

// supervise runs every task at once. When the first one returns, all of
// them are stopped, in order, with that task's error, and supervise returns
// that error once every run has returned. This is oklog/run's shape: one
// failure stops the whole server, so the process never limps along with a
// dead listener.
func supervise(tasks []task) (first string, err error) {
	if len(tasks) == 0 {
		return "", nil
	}
	type result struct {
		name string
		err  error
	}
	done := make(chan result, len(tasks))
	for _, t := range tasks {
		go func() { done <- result{t.name, t.run()} }()
	}
	r := <-done
	cause := r.err
	if cause == nil {
		cause = errStopped
	}
	for _, t := range tasks {
		t.stop(cause)
	}
	for range len(tasks) - 1 {
		<-done
	}
	return r.name, r.err
}
