// Addresses: vue-router with the history API. One route takes every path; which screen a path
// shows is core/routes.ts (`parseScreen`), tested on its own, and the store shows it
// (`applyScreen`) on every navigation: a click, Back and Forward, a reload, a shared link.

import { createRouter, createWebHistory, type RouteLocationNormalized } from "vue-router";
import ScreenView from "./views/ScreenView.vue";
import { parseScreen } from "./core/routes";
import { applyScreen, setNavigator } from "./store";

export const router = createRouter({
  history: createWebHistory("/"),
  routes: [{ path: "/:pathMatch(.*)*", name: "screen", component: ScreenView }],
  scrollBehavior: () => ({ top: 0 }),
});

export function screenOf(route: RouteLocationNormalized) {
  return parseScreen(route.path, route.query);
}

router.afterEach((to) => applyScreen(screenOf(to)));

setNavigator((path, replace) => {
  void (replace ? router.replace(path) : router.push(path));
});
