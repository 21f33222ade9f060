package auth_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/reverst-dev/reverst/auth"
	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/protocol"
)

func ExampleFactory_New() {
	// One Factory for the life of the process; New for each group on every
	// (re)load of the groups definition.
	var f auth.Factory
	a, err := f.New(groups.Authentication{
		Bearer: &groups.Bearer{Token: "some-token"},
	})
	if err != nil {
		panic(err)
	}
	for _, cred := range []string{"Bearer some-token", "Bearer other-token", "Basic dXNlcjpwYXNz"} {
		err := a.Authenticate(context.Background(), map[string]string{"Authorization": cred})
		switch {
		case err == nil:
			fmt.Println("allowed")
		case errors.Is(err, protocol.ErrUnauthorized):
			fmt.Println("denied:", err)
		default:
			fmt.Println("cannot decide, retry later:", err)
		}
	}
	// Output:
	// allowed
	// denied: unauthorized: invalid credentials
	// denied: unauthorized: scheme not accepted by the group
}
