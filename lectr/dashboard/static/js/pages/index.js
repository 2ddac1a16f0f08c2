// Every page of the dashboard, in one table. A page is a small module
// exporting `title` and `render(ctx)` (see docs/dashboard.md, "Adding a
// page"). Pages under /orgs/:org get the org's header and a tab when they
// name one; `needs` hides the tab from roles that may not use it.

import * as orgs from "./orgs.js";
import * as overview from "./overview.js";
import * as keys from "./keys.js";
import * as providerKeys from "./provider-keys.js";
import * as providers from "./providers.js";
import * as members from "./members.js";
import * as requests from "./requests.js";
import * as request from "./request.js";
import * as usage from "./usage.js";
import * as routes from "./routes.js";
import * as limits from "./limits.js";
import * as catalogue from "./catalogue.js";

export const PAGES = [
  { path: "/orgs", page: orgs },
  { path: "/providers", page: catalogue },
  { path: "/orgs/:org", page: overview, tab: "Overview" },
  { path: "/orgs/:org/requests", page: requests, tab: "Requests" },
  { path: "/orgs/:org/requests/:request", page: request },
  { path: "/orgs/:org/usage", page: usage, tab: "Usage" },
  { path: "/orgs/:org/keys", page: keys, tab: "Lectr keys" },
  { path: "/orgs/:org/provider-keys", page: providerKeys, tab: "Provider keys" },
  { path: "/orgs/:org/routes", page: routes, tab: "Routes" },
  { path: "/orgs/:org/limits", page: limits, tab: "Limits" },
  { path: "/orgs/:org/providers", page: providers, tab: "Providers & models" },
  { path: "/orgs/:org/members", page: members, tab: "Members", needs: "owner" },
];
